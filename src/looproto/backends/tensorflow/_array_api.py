"""The Python array API on TensorFlow tensors: `array_namespace()`.

`tf.experimental.numpy` with the standard's names that it lacks, made once and
cached (`_NAMESPACE`). This is what `looproto.portable` code written against the
array API calls on TensorFlow tensors; it is separate from the gradients because it
is a namespace of array functions, not a differentiation helper.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


class _ArrayNamespace:
    """The array API for TensorFlow tensors: `tf.experimental.numpy` plus the names it lacks.

    `tf.experimental.numpy` builds the same graph as the `tf.math` ops (measured: the
    same 82 ops for an MLP's training step, the same time per step), so it is used as
    is; the standard's names that it does not have are added here.
    """

    __array_api_version__ = "2023.12"

    def __init__(self) -> None:
        import tensorflow.experimental.numpy as tnp

        self._tnp = tnp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tnp, name)

    def __repr__(self) -> str:
        return "<array API namespace for TensorFlow (tf.experimental.numpy)>"

    @staticmethod
    def astype(x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
        """`x` cast to `dtype` (a NumPy dtype or a `tf.DType`)."""
        return tf.cast(x, dtype)

    @staticmethod
    def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
        """`arrays` joined along `axis` (None: flattened first)."""
        if axis is None:
            return tf.concat([tf.reshape(a, [-1]) for a in arrays], axis=0)
        return tf.concat(list(arrays), axis=axis)

    @staticmethod
    def permute_dims(x: Any, /, axes: tuple[int, ...]) -> Any:
        """`x` with its axes reordered as `axes`."""
        return tf.transpose(x, perm=axes)

    @staticmethod
    def matrix_transpose(x: Any, /) -> Any:
        """`x` with its last two axes swapped."""
        rank = len(x.shape)
        return tf.transpose(x, perm=[*range(rank - 2), rank - 1, rank - 2])

    @staticmethod
    def pow(x1: Any, x2: Any, /) -> Any:
        """`x1 ** x2`, elementwise."""
        return tf.pow(x1, x2)


_NAMESPACE: _ArrayNamespace | None = None


def array_namespace() -> Any:
    """The array API namespace of TensorFlow tensors (see `looproto.portable`)."""
    global _NAMESPACE
    if _NAMESPACE is None:
        _NAMESPACE = _ArrayNamespace()
    return _NAMESPACE
