"""What `looproto.metrics` and `LearningRateMonitor` ask of JAX-ecosystem objects.

* `hyperparameters`: an optax state made by `optax.inject_hyperparams` (its leaves
  arrays, or `looproto.Variable`s when the state is kept in a module): its
  `hyperparams`, under looproto's names (`b1`, `b2` are `beta_1`, `beta_2`). optax
  computes them at the start of each update, so they are the values of the update
  that ran last (a schedule at `count - 1`).
* `metric_adapter`: a Flax NNX metric (`nnx.metrics.Average`, `nnx.MultiMetric`, ...),
  reset with `reset()` and read with `compute()`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from looproto.backends._common import ComputeMetricAdapter
from looproto.module import Variable, variable_to_numpy

__all__ = ["hyperparameters", "metric_adapter"]

# optax's hyper-parameter names -> looproto's (the same on every backend).
_NAMES = {
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "b1": "beta_1",
    "b2": "beta_2",
}


def hyperparameters(obj: Any) -> dict[str, float] | None:
    """See `looproto.backends.SupportsHyperparameters`."""
    optax = sys.modules.get("optax")
    if optax is None:
        return None
    kinds = tuple(
        kind
        for kind in (
            getattr(optax, "InjectHyperparamsState", None),
            getattr(optax, "InjectStatefulHyperparamsState", None),
        )
        if kind is not None
    )
    if not isinstance(obj, kinds):
        return None
    out: dict[str, float] = {}
    for key, name in _NAMES.items():
        value = obj.hyperparams.get(key)
        if value is None:
            continue
        array = np.asarray(variable_to_numpy(value) if isinstance(value, Variable) else value)
        if array.size == 1:
            out[name] = float(array.reshape(()))
    return out


def metric_adapter(obj: Any) -> ComputeMetricAdapter | None:
    """See `looproto.backends.SupportsMetrics`: Flax NNX metrics, if Flax is imported."""
    metrics = sys.modules.get("flax.nnx.training.metrics")
    if metrics is None or not isinstance(obj, metrics.Metric):
        return None
    return ComputeMetricAdapter(obj)
