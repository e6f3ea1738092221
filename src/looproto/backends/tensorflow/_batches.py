"""How the TensorFlow loop pulls batches from the (nested) iterators it is given.

A loop receives one iterator or a nesting (mapping, list, tuple) of them. These
helpers flatten that nesting and rebuild it, tell `tf.data` iterators from Python
ones, key a batch by its structure and dtypes (what forces a new trace), hand the
step an iterator that yields exactly its one pulled batch (`OneBatchIterator`), and
pull and group the host batches that a stacked loop runs in one call. They hold no
state; the loop (`loop.py`) calls them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from looproto import _nest
from looproto.backends._common import StepIterator


def iter_leaves(iterator: Any) -> list[Any]:
    """The iterators in a (nested) mapping/list/tuple of iterators, in `_nest` order."""
    return [leaf for _, leaf in _nest.flatten_with_paths(iterator)]


def nest_layout(iterator: Any) -> Any:
    """The nesting of `iterator` with its leaves replaced by None."""
    if isinstance(iterator, Mapping):
        return {key: nest_layout(iterator[key]) for key in _nest.sorted_keys(iterator)}
    if isinstance(iterator, (list, tuple)) and not hasattr(iterator, "_fields"):
        return type(iterator)(nest_layout(value) for value in iterator)
    return None


def rebuild_nest(layout: Any, leaves: Iterable[Any]) -> Any:
    """Fills `layout` (from `layout`) with `leaves`, in order."""
    it = iter(leaves)

    def fill(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fill(value) for value in node)
        return next(it)

    return fill(layout)


def is_tf_iterator(iterator: Any) -> bool:
    return isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator))


def batch_signature(leaves: Any) -> tuple[str, tuple[str, ...]]:
    """Structure and dtypes of a batch, ignoring shapes (what forces a new trace)."""
    structure = tf.nest.map_structure(lambda _: "*", leaves)
    dtypes = tuple(
        getattr(t.dtype, "name", str(t.dtype))
        for t in tf.nest.flatten(leaves, expand_composites=True)
    )
    return repr(structure), dtypes


class OneBatchIterator(StepIterator):
    """A `StepIterator` that also answers `tf.data.Iterator`'s methods.

    `next()` gives the step its batch in containers of its own (dicts, lists and
    tuples rebuilt, the tensors shared), so the step may change them, as Orbit's
    examples do with `inputs.pop(label_key)`: the batch is an argument of a
    `tf.function`, which refuses a traced function that changes its Python arguments.
    """

    __slots__ = ()

    def __init__(self, step_name: str, batch: Any) -> None:
        super().__init__(step_name, _TWICE_HINT, batch)

    def __next__(self) -> Any:
        return tf.nest.map_structure(_same, super().__next__())

    def get_next(self) -> Any:
        """`tf.data.Iterator.get_next`: the batch."""
        return next(self)

    def get_next_as_optional(self) -> Any:
        """`tf.data.Iterator.get_next_as_optional`: the batch, always present."""
        return tf.experimental.Optional.from_value(next(self))


def _same(tensor: Any) -> Any:
    return tensor


_TWICE_HINT = (
    "The TensorFlow backend's compiled loop pulls one batch per step from each iterator; "
    "make one dataset element hold what a step needs (e.g. `dataset.batch(k)` or "
    "`tf.data.Dataset.zip`), or run eagerly with `use_compiled_step=False`."
)


def pull_batches(leaves: list[Any], n: int) -> list[tuple[Any, ...]]:
    """Up to `n` steps' batches, one per iterator each; fewer when the data ends."""
    out: list[tuple[Any, ...]] = []
    try:
        for _ in range(n):
            out.append(tuple([next(leaf) for leaf in leaves]))
    except StopIteration:
        pass
    return out


def same_signature_runs(batches: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Runs of consecutive batches whose arrays have the same shapes and dtypes."""
    segments: list[list[tuple[Any, ...]]] = []
    previous: Any = None
    for batch in batches:
        key = tuple((np.shape(a), np.asarray(a).dtype.str) for a in tf.nest.flatten(batch))
        if segments and key == previous:
            segments[-1].append(batch)
        else:
            segments.append([batch])
            previous = key
    return segments
