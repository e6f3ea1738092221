"""Orbit's `orbit.utils.common`: the global step, TensorFlow values, distributed datasets."""

from __future__ import annotations

import inspect
from typing import Any

import tensorflow as tf

from looproto.errors import ConfigError, value_repr

__all__ = ["create_global_step", "get_value", "make_distributed_dataset"]


def create_global_step() -> tf.Variable:
    """A new global step: a non-trainable int64 scalar `tf.Variable` named `global_step`, at 0.

    Under a `tf.distribute` strategy the first replica's value is kept. (Core
    `looproto.create_global_step()` makes a `looproto.Variable`, which every backend
    can update.)
    """
    return tf.Variable(
        0,
        dtype=tf.int64,
        name="global_step",
        trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def get_value(x: Any) -> Any:
    """`x` as NumPy if it is a TensorFlow tensor or variable, else `x` itself."""
    if tf.is_tensor(x) or isinstance(x, tf.Variable):
        return x.numpy()
    return x


def make_distributed_dataset(
    strategy: tf.distribute.Strategy | None, dataset_or_fn: Any, *args: Any, **kwargs: Any
) -> Any:
    """A distributed dataset for `strategy` from a dataset or a function making one.

    Args:
        strategy: The strategy (None: the current one).
        dataset_or_fn: A `tf.data.Dataset`, or a function returning one; a function with
            an `input_context` parameter is given the replica's `tf.distribute.InputContext`.
        *args: Passed to the function.
        **kwargs: Passed to the function, except `input_options` (a
            `tf.distribute.InputOptions` for the distribution).

    Raises:
        ConfigError: `dataset_or_fn` is neither a dataset nor callable.
    """
    strategy = strategy or tf.distribute.get_strategy()
    input_options = kwargs.pop("input_options", None)
    if isinstance(dataset_or_fn, tf.data.Dataset):
        return strategy.experimental_distribute_dataset(dataset_or_fn, input_options)
    if not callable(dataset_or_fn):
        raise ConfigError(
            "`dataset_or_fn` must be a `tf.data.Dataset` or a function returning one; "
            f"received {value_repr(dataset_or_fn)}."
        )
    wants_context = "input_context" in inspect.signature(dataset_or_fn).parameters

    def dataset_fn(input_context: tf.distribute.InputContext) -> Any:
        if wants_context:
            return dataset_or_fn(*args, input_context=input_context, **kwargs)
        return dataset_or_fn(*args, **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn, input_options)
