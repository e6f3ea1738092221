"""Pytrees of arrays, the values a `Variable` may hold besides one array.

A tree is built of dicts, lists, tuples and namedtuples, with arrays as its leaves
(`None` is an empty subtree, as in JAX). That is all an optimizer state such as
optax's is made of (namedtuples of dicts of arrays), and none of it belongs to a
framework, so the core walks and rebuilds it itself. Dict keys are walked in sorted
order and paths name dict keys, namedtuple fields and list indices (`"0/mu/w"`), as
`tf.nest` and checkpoints do. Lists of plain numbers stay arrays (`Variable([1, 2])`
is a vector), so only containers holding an array, a dict, a namedtuple or `None`
count as trees. `TreeLeaf` is one leaf of a `TreeVariable`, as checkpoints see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from looproto import backends
from looproto.errors import ProtocolError, ShapeError, value_repr

Path = tuple[Any, ...]


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _is_array(value: Any) -> bool:
    """A leaf: an array of any framework (NumPy scalars count as numbers)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic)


def is_tree(value: Any) -> bool:
    """Whether `value` is a pytree of arrays rather than one array-like value."""
    if isinstance(value, dict) or _is_namedtuple(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(v is None or _is_array(v) or is_tree(v) for v in value)
    return False


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    """`(key, child)` of a tree node, None for a leaf."""
    if isinstance(value, dict):
        try:
            keys = sorted(value)
        except TypeError as err:
            raise ProtocolError(
                f"A Variable's tree has a dict with unsortable keys {list(value)!r}."
            ) from err
        return [(key, value[key]) for key in keys]
    if _is_namedtuple(value):
        return list(zip(type(value)._fields, value))
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return None


def _rebuild(like: Any, children: list[Any]) -> Any:
    """A node of `like`'s type holding `children` (in `_children`'s order)."""
    if isinstance(like, dict):
        return type(like)(zip(sorted(like), children))
    if _is_namedtuple(like):
        return type(like)(*children)
    return type(like)(children)


def leaves_with_paths(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """`(path, leaf)` for every leaf of `tree`, in walk order (no leaf for `None`)."""
    if tree is None:
        return
    children = _children(tree)
    if children is None:
        yield path, tree
        return
    for key, child in children:
        yield from leaves_with_paths(child, (*path, key))


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def leaf_at(tree: Any, path: Path) -> Any:
    """The leaf of `tree` at `path` (one step per key, not a walk of the tree)."""
    node = tree
    try:
        for key in path:
            node = getattr(node, key) if _is_namedtuple(node) else node[key]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ShapeError(f"The tree has no leaf at {path_str(path)!r}.") from err
    return node


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """`tree` with each leaf replaced by `fn(leaf)`; containers are new objects."""
    if tree is None:
        return None
    children = _children(tree)
    if children is None:
        return fn(tree)
    return _rebuild(tree, [map_leaves(fn, child) for _, child in children])


def replace_leaf(tree: Any, path: Path, leaf: Any) -> Any:
    """`tree` with the leaf at `path` replaced; only the containers on the path are copied."""
    if not path:
        return leaf
    children = _children(tree)
    if children is None:
        raise ShapeError(f"No leaf at {path_str(path)!r}: the tree ends before it.")
    keys = [key for key, _ in children]
    if path[0] not in keys:
        raise ShapeError(f"No leaf at {path_str(path)!r}: the tree has no key {path[0]!r}.")
    return _rebuild(
        tree,
        [
            replace_leaf(child, path[1:], leaf) if key == path[0] else child
            for key, child in children
        ],
    )


def from_value(value: Any, as_leaf: Callable[[Any], Any]) -> Any:
    """A new tree like `value`, each leaf converted by `as_leaf` (what `Variable()` keeps).

    Raises:
        ProtocolError: A node is neither a dict, list, tuple, namedtuple nor an array
            or a number.
    """
    if value is None:
        return None
    children = _children(value)
    if children is None:
        if not (_is_array(value) or isinstance(value, (bool, int, float, complex, np.generic))):
            raise ProtocolError(
                f"A Variable's tree holds {value_repr(value)} of type {type(value).__name__}; "
                "a tree is made of dicts, lists, tuples and namedtuples of arrays or numbers."
            )
        return as_leaf(value)
    return _rebuild(value, [from_value(child, as_leaf) for _, child in children])


def _where(name: str, path: Path) -> str:
    return f"{name!r} at {path_str(path)!r}" if path else repr(name)


def checked_like(current: Any, value: Any, name: str, path: Path = ()) -> Any:
    """`value` as the Variable's new tree: its structure, shapes and dtypes must be `current`'s.

    NumPy input is copied (never aliased); Python numbers are cast to the leaf's dtype
    when that is safe; other arrays (a framework's, or its traced values) must have the
    leaf's shape and dtype already.

    Raises:
        ShapeError: Another structure (container type, keys, length), or a leaf of
            another shape or dtype; the message names the leaf's path.
    """
    if current is None:
        if value is not None:
            raise ShapeError(
                f"Cannot assign {value_repr(value)} to variable {_where(name, path)}: the "
                "tree holds None there."
            )
        return None
    children = _children(current)
    if children is None:
        return _checked_leaf(current, value, name, path)
    new = _children(value) if type(value) is type(current) else None
    if new is None or [k for k, _ in new] != [k for k, _ in children]:
        raise ShapeError(
            f"Cannot assign {value_repr(value)} to variable {_where(name, path)}: expected a "
            f"{type(current).__name__} with keys {[k for k, _ in children]}, like the "
            "tree the variable was created with (its structure is fixed)."
        )
    return _rebuild(
        current,
        [
            checked_like(old, child, name, (*path, key))
            for (key, old), (_, child) in zip(children, new)
        ],
    )


def _checked_leaf(current: Any, value: Any, name: str, path: Path) -> Any:
    if not _is_array(value):
        if isinstance(value, (bool, int, float, complex, np.generic)) and isinstance(
            current.dtype, np.dtype
        ):
            array = np.asarray(value)
            if np.can_cast(array.dtype, current.dtype, casting="same_kind"):
                value = np.asarray(array, dtype=current.dtype)
        if not _is_array(value):
            raise ShapeError(
                f"Cannot assign {value_repr(value)} to variable {_where(name, path)}, which "
                f"holds an array of dtype {current.dtype} there."
            )
    elif isinstance(value, np.ndarray):
        value = value.copy()
    if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
        raise ShapeError(
            f"Cannot assign a value of shape {tuple(value.shape)} and dtype {value.dtype} to "
            f"variable {_where(name, path)}, of shape {tuple(current.shape)} and dtype "
            f"{current.dtype}: shapes and dtypes are fixed when the variable is created."
        )
    return value


def leaf_to_numpy(leaf: Any) -> np.ndarray[Any, Any]:
    """A host NumPy copy of one leaf (a framework's array: by its backend)."""
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.array(leaf)
    found = backends.for_object(leaf)
    if not found:
        raise ProtocolError(f"No backend understands the leaf {value_repr(leaf)}.")
    return found[0].to_numpy(leaf)


class TreeLeaf:
    """One leaf of a `TreeVariable`, read and written as a variable is (checkpoints do).

    `assign` goes through the leaf's backend as a one-array `Variable` would (dtype
    casts, device, sharding, typed keys); only the containers on the leaf's path are
    rebuilt.
    """

    __slots__ = ("_path", "variable")

    def __init__(self, variable: Any, path: Path) -> None:
        self.variable = variable
        self._path = path

    @property
    def name(self) -> str:
        """The variable's name and the leaf's path: `"opt_state:0/0/mu/w"`."""
        return f"{self.variable.name}/{path_str(self._path)}"

    @property
    def value(self) -> Any:
        """The leaf's current array."""
        return leaf_at(self.variable.value, self._path)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return backends.numpy_dtype(self.value.dtype)

    def numpy(self) -> np.ndarray[Any, Any]:
        return leaf_to_numpy(self.value)

    def assign(self, array: Any) -> None:
        self.variable._assign_leaf(self._path, array)
