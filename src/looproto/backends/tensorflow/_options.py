"""The TensorFlow backend's `backend_options`: their names, defaults and validation.

`StandardTrainerOptions(backend_options={...})` reaches the backend as a plain
mapping; `check_settings` turns it into the complete, validated settings a
`TensorflowLoop` is built with (the options themselves are described in the
package docstring). Kept apart so the accepted options and their checks read as one
list, separate from the loop that uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import tensorflow as tf

from looproto.errors import ConfigError, value_repr

_REDUCTIONS: Final = ("mean", "sum", "first", "concat")
_OPTION_DEFAULTS: Final[dict[str, Any]] = {
    "strategy": None,
    "wrap_strategy_run": True,
    "output_reduction": "mean",
    "jit_compile": None,
    "reduce_retracing": False,
    "data": "auto",
}
_DATA_MODES: Final = ("auto", "stack", "step")


def check_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"Unknown TensorFlow `backend_options` {unknown}; expected some of "
            f"{sorted(_OPTION_DEFAULTS)}."
        )
    settings = {**_OPTION_DEFAULTS, **raw}
    strategy = settings["strategy"]
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise ConfigError(
            f"`strategy` must be a `tf.distribute.Strategy` or None; received "
            f"strategy={value_repr(strategy)}."
        )
    for key in ("wrap_strategy_run", "reduce_retracing"):
        if not isinstance(settings[key], bool):
            raise ConfigError(f"`{key}` must be a bool; received {key}={settings[key]!r}.")
    if settings["jit_compile"] is not None and not isinstance(settings["jit_compile"], bool):
        raise ConfigError(
            f"`jit_compile` must be a bool or None; received jit_compile="
            f"{settings['jit_compile']!r}."
        )
    if settings["data"] not in _DATA_MODES:
        raise ConfigError(
            f"`data` must be one of {list(_DATA_MODES)}; received data={settings['data']!r}."
        )
    if settings["output_reduction"] not in _REDUCTIONS:
        raise ConfigError(
            f"`output_reduction` must be one of {list(_REDUCTIONS)}; received "
            f"output_reduction={settings['output_reduction']!r}."
        )
    return settings
