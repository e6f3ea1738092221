"""Private: the metrics a checkpoint is saved with, and which checkpoints the best are.

`CheckpointManager(best_fn=..., best_mode=..., keep_best=k)` stores an evaluation's
output with each checkpoint (in its JSON item, as `metrics`), scores it with `best_fn`
and keeps the `k` best besides the newest `max_to_keep`. The scores are read back
from disk, so checkpoints of earlier runs take part.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from looproto import _nest
from looproto.checkpoint._files import META_ITEM
from looproto.errors import ConfigError, value_repr

__all__ = ["BestFn", "check_best", "metrics_json", "read_metrics", "score", "select"]

BestFn = Callable[[Mapping[str, Any]], Any]
_MODES = ("max", "min")


def check_best(best_fn: Any, best_mode: Any, keep_best: Any) -> int | None:
    """Validates the three arguments; returns how many best checkpoints to keep."""
    if best_fn is None:
        if keep_best is not None:
            raise ConfigError(
                f"`keep_best` is {keep_best!r} but `best_fn` is None: which checkpoints are "
                "best needs a metric (e.g. `best_fn='eval_loss', best_mode='min'`)."
            )
        return None
    if not (isinstance(best_fn, str) and best_fn) and not callable(best_fn):
        raise ConfigError(
            "`best_fn` must be an output key (a str such as 'eval_loss' or 'metrics/mae') or a "
            f"callable of the metrics returning a number; received best_fn={value_repr(best_fn)}."
        )
    if best_mode not in _MODES:
        raise ConfigError(f"`best_mode` must be 'max' or 'min'; received best_mode={best_mode!r}.")
    if keep_best is None:
        return 1
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1:
        raise ConfigError(
            f"`keep_best` must be a positive int (or None: 1); received keep_best={keep_best!r}."
        )
    return keep_best


def metrics_json(output: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's output as JSON: nested mappings of floats (None where not finite).

    Leaves with more than one element (histograms) are left out.
    """
    out: dict[str, Any] = {}
    for key, value in output.items():
        if isinstance(value, Mapping):
            out[str(key)] = metrics_json(value)
            continue
        array = np.asarray(_nest.to_numpy_leaf(value))
        if array.size != 1 or not np.issubdtype(array.dtype, np.number):
            continue
        number = float(array.reshape(()))
        out[str(key)] = number if math.isfinite(number) else None
    return out


def score(best_fn: str | BestFn, metrics: Mapping[str, Any], where: str) -> float | None:
    """`best_fn` of `metrics` as a float; None when it is missing or not finite.

    Raises:
        ConfigError: `best_fn` names a key the metrics lack, or returns a non-number.
    """
    value: Any
    if isinstance(best_fn, str):
        try:
            value = _nest.lookup(metrics, best_fn)
        except KeyError:
            raise ConfigError(
                f"`best_fn` {best_fn!r} is not in the metrics of {where}; they have "
                f"{_keys(metrics)}."
            ) from None
    else:
        value = best_fn(metrics)
    if value is None:
        return None
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError):
        raise ConfigError(
            f"`best_fn` must give a number for {where}; received {value_repr(value)}."
        ) from None
    return number if math.isfinite(number) else None


def _keys(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            keys += _keys(value, f"{prefix}{key}/")
        else:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


def read_metrics(where: str) -> dict[str, Any] | None:
    """The metrics a committed checkpoint was saved with, or None (none, or unreadable)."""
    try:
        with open(os.path.join(where, META_ITEM, "metadata"), encoding="utf-8") as f:
            metrics = json.load(f).get("metrics")
    except (OSError, ValueError, AttributeError):
        return None
    return metrics if isinstance(metrics, dict) else None


def select(
    newest_first: list[int], scores: Mapping[int, float | None], keep_best: int, best_mode: str
) -> list[int]:
    """The `keep_best` best steps of `newest_first` by score (ties: the newer), best first."""
    scored = [(value, step) for step in newest_first if (value := scores.get(step)) is not None]
    sign = -1.0 if best_mode == "max" else 1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1]))
    return [step for _, step in scored[:keep_best]]
