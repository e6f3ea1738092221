"""Private: Orbit's values (tensors, `tf.Variable`s) as the looproto core takes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from looproto.errors import ConfigError, value_repr
from looproto.module import Variable


def as_int(value: Any, argument: str) -> Any:
    """An int from an int, a NumPy integer or an integer scalar tensor; else `value`.

    Other values are returned as they are, for the core's own check to reject with its
    message.

    Raises:
        ConfigError: `value` is a tensor that is not an integer scalar.
    """
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (tf.Tensor, tf.Variable)):
        if value.shape.rank != 0 or not value.dtype.is_integer:
            raise ConfigError(
                f"`{argument}` must be an integer scalar; received {value_repr(value)}."
            )
        return int(value.numpy())
    return value


def step_value(step: Any) -> Any:
    """What to compute with for the global step: the `tf.Variable` itself, or the value.

    A `looproto.Variable` gives its value, which is its `tf.Variable` twin inside a
    TensorFlow loop, so `step_value(step) % n == 0` runs in the loop's graph.
    """
    if isinstance(step, Variable):
        return step.value
    return step
