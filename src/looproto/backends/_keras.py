"""Keras 3 on a backend other than TensorFlow: not captured by checkpoints, so refused.

On Keras' JAX and torch backends a layer's state sits in `keras.Variable`s and Keras'
own containers (under per-process unique names), and its optimizers and metrics are
not the framework's objects; looproto walks Keras only on TensorFlow. Until it walks
them elsewhere, the JAX and torch backends expand a Keras object into an `Unsaveable`
leaf, so a save fails naming it instead of leaving it out silently.
"""

from __future__ import annotations

import sys
from typing import Any

from looproto.backends.base import Unsaveable

__all__ = ["keras_refusal"]


def keras_refusal(
    obj: Any, keras_backend: str, shown_as: str, instead: str
) -> list[tuple[tuple[Any, ...], Any]] | None:
    """`[((), Unsaveable)]` for a Keras layer, optimizer, metric or seed, else None.

    Args:
        obj: What the module walk reached.
        keras_backend: The Keras backend refused (`keras.backend.backend()`'s name).
        shown_as: Its name in the error ("JAX").
        instead: What to hold instead, the end of the error's advice.
    """
    keras = sys.modules.get("keras")
    if keras is None or not _from_keras(type(obj)):
        return None
    try:
        if keras.backend.backend() != keras_backend:
            return None
        kinds = (
            keras.layers.Layer,
            keras.optimizers.Optimizer,
            keras.metrics.Metric,
            keras.random.SeedGenerator,
        )
    except AttributeError:  # pragma: no cover - a partial import
        return None
    if not isinstance(obj, kinds):
        return None
    reason = (
        f"a Keras 3 object running on Keras' {shown_as} backend, whose state looproto's "
        "checkpoints do not capture yet. Run Keras on the TensorFlow backend "
        "(`KERAS_BACKEND=tensorflow`), where looproto saves Keras models, optimizers and "
        f"metrics whole, or {instead}."
    )
    return [((), Unsaveable(reason))]


def _from_keras(cls: type) -> bool:
    return any(getattr(base, "__module__", "").startswith("keras.") for base in cls.__mro__)
