"""Keras 3 running on JAX: not captured by looproto's checkpoints, so refused by name.

Keras' JAX backend keeps a layer's state in `keras.Variable`s outside the JAX arrays
looproto lifts and checkpoints; until looproto walks them, a Keras object held by a
trainer on this backend is an `Unsaveable` leaf, so a save fails naming it instead of
leaving it out silently.
"""

from __future__ import annotations

import sys
from typing import Any

from looproto.backends.base import Unsaveable

__all__ = ["keras_refusal"]

KERAS_ON_JAX = (
    "a Keras 3 object running on Keras' JAX backend, whose state looproto's checkpoints "
    "do not capture yet. Run Keras on the TensorFlow backend (`KERAS_BACKEND=tensorflow`), "
    "where looproto saves Keras models, optimizers and metrics whole, or hold the state "
    "in `looproto.Variable`s or Flax NNX modules."
)


def keras_refusal(obj: Any) -> list[tuple[tuple[Any, ...], Any]] | None:
    """`[((), Unsaveable)]` for a Keras layer, optimizer, metric or seed on JAX, else None."""
    keras = sys.modules.get("keras")
    if keras is None or not any(c.__module__.startswith("keras.") for c in type(obj).__mro__):
        return None
    try:
        if keras.backend.backend() != "jax":
            return None
        kinds = (
            keras.layers.Layer,
            keras.optimizers.Optimizer,
            keras.metrics.Metric,
            keras.random.SeedGenerator,
        )
    except AttributeError:  # pragma: no cover - a partial import
        return None
    return [((), Unsaveable(KERAS_ON_JAX))] if isinstance(obj, kinds) else None
