"""Which objects are TensorFlow variables, and the paths of those inside Keras objects.

`tf.Variable`s are recognised by TensorFlow itself; Keras 3 variables (when Keras is
imported and runs on TensorFlow) need `keras` without importing it. Used by the
backend's discovery (`is_variable`, `expand`; Keras objects are walked in `_keras.py`),
by `assign` and the lifting (dtypes), and by the gradient helpers.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tensorflow as tf


def keras_module() -> Any:
    """The `keras` module when it is imported and runs on TensorFlow, else None."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        if keras.backend.backend() != "tensorflow":
            return None
    except AttributeError:  # pragma: no cover - a partial import
        return None
    return keras


def is_keras_variable(obj: Any) -> bool:
    keras = keras_module()
    return keras is not None and isinstance(obj, keras.Variable)


def variable_dtype(variable: Any) -> np.dtype[Any]:
    dtype = variable.dtype
    if isinstance(dtype, tf.DType):
        return np.dtype(dtype.as_numpy_dtype)
    return np.dtype(dtype)
