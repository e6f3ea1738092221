"""Which objects are TensorFlow variables, and the paths of those inside Keras objects.

`tf.Variable`s are recognised by TensorFlow itself; Keras 3 variables (when Keras is
imported and runs on TensorFlow) need `keras` without importing it, and the variables
of a Keras layer or optimizer are keyed by their Keras `path` relative to the
attribute that holds the owner. Used by the backend's discovery (`is_variable`,
`expand`), by `assign` and the lifting (dtypes), and by the gradient helpers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
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


def keras_paths(obj: Any, variables: Iterable[Any]) -> list[tuple[tuple[Any, ...], Any]]:
    # Keras paths start with the owner's (auto-uniquified) name; drop it so keys are
    # relative to the attribute that holds the layer.
    own = {str(getattr(obj, "name", "")), str(getattr(obj, "name", "")).lower()}
    pairs = []
    for variable in variables:
        parts = tuple(str(getattr(variable, "path", variable.name)).split("/"))
        if len(parts) > 1 and parts[0] in own:
            parts = parts[1:]
        pairs.append((parts, variable))
    return pairs
