"""Orbit's `OptionalSummariesFunction`: one function compiled with and without summaries.

Writing summaries costs on accelerators even on steps that record none; two
`tf.function`s of one function, one with `tf.summary` compiled out, let a caller run
the few steps that record with the first and the others with the second.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

__all__ = ["OptionalSummariesFunction"]


@contextlib.contextmanager
def _soft_device_placement() -> Iterator[None]:
    # Summary ops have no TPU kernel: soft placement runs them on the host.
    previous = tf.config.get_soft_device_placement()
    try:
        tf.config.set_soft_device_placement(True)
        yield
    finally:
        tf.config.set_soft_device_placement(previous)


class OptionalSummariesFunction:
    """`function` compiled twice: `with_summaries` and `without_summaries`.

    `with_summaries` records what the active `tf.summary.record_if` says (with soft
    device placement, for TPUs); `without_summaries` runs under `record_if(False)`, so
    its summary ops are compiled out. Subclass it and define `__call__` to choose
    between them (e.g. one step with summaries when `tf.summary.should_record_summaries()`,
    the rest without). It works on functions and, as a decorator, on methods.

    Args:
        function: The function to compile.
        **tf_function_kwargs: Passed to both `tf.function`s (`input_signature`, ...).
    """

    with_summaries: Any
    without_summaries: Any

    def __init__(self, function: Callable[..., Any], **tf_function_kwargs: Any) -> None:
        @tf.function(**tf_function_kwargs)
        @functools.wraps(function)
        def with_summaries(*args: Any, **kwargs: Any) -> Any:
            with _soft_device_placement():
                return function(*args, **kwargs)

        @tf.function(**tf_function_kwargs)
        @functools.wraps(function)
        def without_summaries(*args: Any, **kwargs: Any) -> Any:
            with tf.summary.record_if(False):
                return function(*args, **kwargs)

        self.with_summaries = with_summaries
        self.without_summaries = without_summaries

    def __get__(self, instance: Any, owner: Any) -> Any:
        # As a method: both functions bound to `instance`, through `tf.function`'s own
        # binding (which an `input_signature` needs).
        bound = object.__new__(type(self))
        bound.with_summaries = self.with_summaries.__get__(instance, owner)
        bound.without_summaries = self.without_summaries.__get__(instance, owner)
        return bound
