"""Host-side batch feeding for the compiled loop: pulling, stacking, step iterators.

Before each compiled call the loop pulls up to `num_steps` elements from the user's
(possibly nested) iterator and stacks them along a new leading axis, in runs of equal
shapes (`segments`); inside the trace the step gets `StepIterator`s over the current
step's slice, nested as the original iterator was (`iter_spec`, `step_iterators`).
`part_length` says how `pipeline_chunks` splits a loop into compiled calls. None of
this depends on the loop's own state, so it is kept apart from `loop.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from looproto.backends._common import StepIterator, is_iterator_container

_TWICE_HINT = (
    "The JAX compiled loop feeds exactly one batch per step; batch larger in the dataset, "
    "or run with `use_compiled_loop=False` (a Python loop over a jitted step)."
)


MIN_PART = 8  # `pipeline_chunks` splits no loop into calls shorter than this.


def part_length(total: int, parts: int) -> int:
    """Steps per compiled call of a loop of `total` steps and `pipeline_chunks=parts`:
    `total` split into at most `parts` equal parts of `MIN_PART` steps or more (so a
    loop compiles one length), else `total`."""
    for n in range(parts, 1, -1):
        if total % n == 0 and total // n >= MIN_PART:
            return total // n
    return total


def _next_all(iterator: Any) -> Any:
    """One element from each iterator of a (nested mapping/list of) iterator(s)."""
    if isinstance(iterator, Mapping):
        return {key: _next_all(value) for key, value in iterator.items()}
    if is_iterator_container(iterator):
        return tuple(_next_all(value) for value in iterator)
    return next(iterator)


def iter_spec(iterator: Any) -> Any:
    """A hashable description of an iterator's nesting (the compiled step depends on it)."""
    if iterator is None:
        return None
    if isinstance(iterator, Mapping):
        return ("map", tuple((k, iter_spec(v)) for k, v in iterator.items()))
    if is_iterator_container(iterator):
        return ("seq", type(iterator), tuple(iter_spec(v) for v in iterator))
    return "leaf"


def step_iterators(spec: Any, batch: Any, step_name: str) -> Any:
    """The nesting `spec`, each leaf a `StepIterator` over its part of `batch`."""
    if spec is None:
        return StepIterator(step_name, _TWICE_HINT)
    if spec == "leaf":
        return StepIterator(step_name, _TWICE_HINT, batch)
    if spec[0] == "map":
        return {k: step_iterators(s, batch[k], step_name) for k, s in spec[1]}
    return spec[1](step_iterators(s, b, step_name) for s, b in zip(spec[2], batch))


def pull(iterator: Any, n: int) -> list[Any]:
    """Up to `n` elements; fewer when the data ends (no element is lost)."""
    if iterator is None:
        return [None] * n
    if not is_iterator_container(iterator):
        return list(itertools.islice(iterator, n))
    out: list[Any] = []
    try:
        for _ in range(n):
            out.append(_next_all(iterator))
    except StopIteration:
        pass
    return out


def _stack_leaves(column: Sequence[Any]) -> Any:
    """Raises ValueError (also for a mix of array and non-array) if shapes differ."""
    try:
        if isinstance(column[0], jax.Array):
            return jnp.stack(column)
        return np.stack(column)
    except TypeError as err:
        raise ValueError(str(err)) from err


def _signature(batch: Any) -> Any:
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves)


def _stack(batches: list[Any]) -> Any:
    first = batches[0]
    # Fast paths for the common batches (an array; a flat dict of arrays, as
    # `ArrayDataset` yields): flattening 100 pytrees costs about as much as stacking.
    if isinstance(first, (np.ndarray, jax.Array)):
        return _stack_leaves(batches)
    if type(first) is dict and all(isinstance(v, (np.ndarray, jax.Array)) for v in first.values()):
        keys = first.keys()
        if all(type(b) is dict and b.keys() == keys for b in batches):
            return {key: _stack_leaves([b[key] for b in batches]) for key in keys}
    flat = [jax.tree.flatten(b) for b in batches]
    treedef = flat[0][1]
    if any(f[1] != treedef for f in flat):  # type: ignore[operator]
        raise ValueError("batches differ in structure")
    return jax.tree.unflatten(treedef, [_stack_leaves(c) for c in zip(*(f[0] for f in flat))])


def segments(batches: list[Any]) -> list[tuple[int, Any]]:
    """Stacks runs of equally shaped batches: `[(num_steps, stacked), ...]`."""
    if batches[0] is None:
        return [(len(batches), None)]
    try:
        return [(len(batches), _stack(batches))]
    except ValueError:
        pass  # Shapes differ (e.g. a short last batch): one call per run of equal shapes.
    signatures = [_signature(b) for b in batches]
    out: list[tuple[int, Any]] = []
    start = 0
    for i in range(1, len(batches) + 1):
        if i == len(batches) or signatures[i] != signatures[start]:
            out.append((i - start, _stack(batches[start:i])))
            start = i
    return out
