"""What `looproto.metrics` and `LearningRateMonitor` ask of Keras objects (Keras on TensorFlow).

* `hyperparameters`: a Keras optimizer's `learning_rate` -- its schedule evaluated at
  the optimizer's `iterations`, i.e. what the next step applies -- and its
  `weight_decay`, `momentum`, `beta_1` and `beta_2` where it has them.
* `metric_adapter`: a Keras metric, reset with `reset_state()` and read with
  `result()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from looproto.backends.tensorflow._variables import keras_module

__all__ = ["KerasMetricAdapter", "hyperparameters", "metric_adapter"]

_ATTRIBUTES = ("learning_rate", "weight_decay", "momentum", "beta_1", "beta_2")


def _number(keras: Any, value: Any) -> float | None:
    if value is None or isinstance(value, bool) or callable(value):
        return None
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return None
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def hyperparameters(obj: Any) -> dict[str, float] | None:
    """See `looproto.backends.SupportsHyperparameters`."""
    keras = keras_module()
    if keras is None or not isinstance(obj, keras.optimizers.Optimizer):
        return None
    out: dict[str, float] = {}
    for name in _ATTRIBUTES:
        value = _number(keras, getattr(obj, name, None))
        if value is not None:
            out[name] = value
    return out


class KerasMetricAdapter:
    """A Keras metric as `looproto.metrics` uses it."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def reset(self) -> None:
        """`metric.reset_state()`."""
        self.metric.reset_state()

    def result(self) -> Any:
        """`metric.result()`."""
        return self.metric.result()


def metric_adapter(obj: Any) -> KerasMetricAdapter | None:
    """See `looproto.backends.SupportsMetrics`: Keras metrics."""
    keras = keras_module()
    if keras is None or not isinstance(obj, keras.metrics.Metric):
        return None
    return KerasMetricAdapter(obj)
