"""Keras 3 running on PyTorch: not captured by looproto's checkpoints, so refused by name.

A Keras layer on Keras' torch backend is a `torch.nn.Module`, but its variables sit in
Keras' own containers under Keras' per-process unique names, and its optimizers and
metrics are not torch objects at all; until looproto walks them as it does on
TensorFlow, a Keras object held by a trainer on this backend is an `Unsaveable` leaf.
"""

from __future__ import annotations

import sys
from typing import Any

from looproto.backends.base import Unsaveable

__all__ = ["keras_refusal"]

KERAS_ON_TORCH = (
    "a Keras 3 object running on Keras' torch backend, whose state looproto's checkpoints "
    "do not capture yet. Run Keras on the TensorFlow backend (`KERAS_BACKEND=tensorflow`), "
    "where looproto saves Keras models, optimizers and metrics whole, or use torch "
    "modules and optimizers."
)


def keras_refusal(obj: Any) -> list[tuple[tuple[Any, ...], Any]] | None:
    """`[((), Unsaveable)]` for a Keras layer, optimizer, metric or seed on torch, else None."""
    keras = sys.modules.get("keras")
    if keras is None or not _from_keras(type(obj)):
        return None
    try:
        if keras.backend.backend() != "torch":
            return None
        kinds = (
            keras.layers.Layer,
            keras.optimizers.Optimizer,
            keras.metrics.Metric,
            keras.random.SeedGenerator,
        )
    except AttributeError:  # pragma: no cover - a partial import
        return None
    return [((), Unsaveable(KERAS_ON_TORCH))] if isinstance(obj, kinds) else None


def _from_keras(cls: type) -> bool:
    return any(getattr(base, "__module__", "").startswith("keras.") for base in cls.__mro__)
