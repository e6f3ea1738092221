"""The `conftest.py` of Orbit's test files as `tests/orbit/suite.py` runs them.

`suite.py` copies this file next to the test files it builds (in a temporary
directory, with `suite.json` beside it) and runs pytest there in one subprocess. It
parses absl's flags once (Orbit's tests are absltest tests, which read `--test_tmpdir`),
puts the offline `tensorflow_datasets` stand-in on `sys.path`, makes the renamed
`single_task` example importable as `looproto.orbit.examples.single_task`, and skips
the tests that read Orbit's private `_orbit_api_gauge`.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
from typing import Any

import pytest

GAUGE = "_orbit_api_gauge"
GAUGE_REASON = (
    "reads Orbit's private `controller._orbit_api_gauge`, TensorFlow's internal "
    "API-usage telemetry cell, which looproto.orbit does not mirror"
)


def _settings() -> dict[str, Any]:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite.json")) as f:
        settings: dict[str, Any] = json.load(f)
    return settings


def pytest_configure(config: pytest.Config) -> None:
    settings = _settings()
    sys.path.insert(0, settings["shims"])
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # absltest's flags, at their defaults
    examples = settings.get("examples")
    if examples:
        import looproto.orbit

        package = types.ModuleType("looproto.orbit.examples")
        package.__path__ = [examples]
        sys.modules[package.__name__] = package
        looproto.orbit.examples = package  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _settings().get("skip_gauge"):
        return
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and GAUGE in inspect.getsource(function):
            item.add_marker(pytest.mark.skip(reason=GAUGE_REASON))
