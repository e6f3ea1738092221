"""Orbit's own test suite, imports renamed, passes on `looproto.orbit`.

The test files of the installed `tf-models-official` wheel are copied with every
`orbit` import rewritten to `looproto.orbit` (see `suite.py`) and run in one pytest
subprocess. Every test passes, except those that read Orbit's private
`_orbit_api_gauge`, which are skipped with that reason. The same files, unchanged,
run against real Orbit as a control of the harness. The per-file counts of both runs
are printed at the end of the pytest run.
"""

from __future__ import annotations

import pytest

from . import suite

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytest.importorskip("sklearn")
if suite.orbit_package() is None:
    pytest.skip(
        "the tf-models-official wheel (Orbit's test files) is not installed: "
        "`pip install --no-deps tf-models-official==2.20.0`",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

GAUGE_TESTS = {
    "ControllerTest.test_no_checkpoint",
    "ControllerTest.test_no_checkpoint_and_summaries",
    "ControllerTest.test_has_checkpoint_no_summaries_sync_checkpoint_saving",
    "ControllerTest.test_has_checkpoint_no_summaries_async_checkpoint_saving",
}


def _check(result: suite.SuiteResult) -> None:
    assert result.files, f"no test ran:\n{result.output[-5000:]}"
    failed = {
        f"{name}::{test}": message
        for name, outcome in result.files.items()
        for test, message in outcome.failed.items()
    }
    assert not failed, f"failed: {failed}\n{result.output[-5000:]}"


def test_orbit_suite_passes_on_looproto_orbit(tmp_path):
    suite.build(tmp_path, against="looproto")
    result = suite.run(tmp_path)
    suite.REPORTS.append(result.table("Orbit's tests, imports renamed, on looproto.orbit:"))
    _check(result)
    skipped = {
        test: reason
        for outcome in result.files.values()
        for test, reason in outcome.skipped.items()
    }
    assert set(skipped) == GAUGE_TESTS
    assert all("_orbit_api_gauge" in reason for reason in skipped.values())
    expected = {name: outcome.total for name, outcome in result.files.items()}
    assert len(expected) == len(suite.test_files(suite.orbit_package()))  # every file ran
    assert sum(expected.values()) == 58


def test_orbit_suite_passes_on_real_orbit(tmp_path):
    # The control: the harness (conftest, flags, the tfds stand-in) is sound when the
    # unchanged files pass on the Orbit they were written for.
    suite.build(tmp_path, against="orbit")
    result = suite.run(tmp_path)
    suite.REPORTS.append(result.table("Orbit's tests on real Orbit (control):"))
    _check(result)
    assert not any(outcome.skipped for outcome in result.files.values())
    assert sum(outcome.total for outcome in result.files.values()) == 58
