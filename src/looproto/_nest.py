"""Private: walking nested containers the way `tf.nest` does, plus output helpers.

`flatten_with_paths` decides what counts as a container: lists and tuples by index,
mappings by sorted key, namedtuples, attrs classes and dataclass instances by field
name. Everything else is a leaf, unless the caller says otherwise (`Module` discovery
keeps Modules and Variables whole and has backends walk their frameworks' containers).
No framework is named here.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from looproto import backends
from looproto.errors import ProtocolError, value_repr

Path = tuple[Any, ...]

# Types that `collections.abc.Sequence` admits but that are values, not containers.
_ATOMIC_SEQUENCES = (str, bytes, bytearray, memoryview, range)


def sorted_keys(mapping: Mapping[Any, Any]) -> list[Any]:
    """Returns the keys of `mapping` sorted, as `tf.nest` requires."""
    try:
        return sorted(mapping)
    except TypeError as err:
        raise TypeError("nest only supports dicts with sortable keys.") from err


# Types seen to be leaves. Whether a value is a container depends on its type alone, so
# the checks below (several of them slow ABC `isinstance`s) run once per type: the
# compiled loops walk their module on every call. (A type registered with an ABC such
# as `Mapping` after it was first walked stays a leaf.)
_leaf_types: set[type] = set()


def children(
    value: Any, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[Any, Any]] | None:
    """Returns `(path element, child)` pairs if `value` is a container, else None.

    `is_leaf(value)` True keeps `value` whole. It must depend on the type alone: the
    type is remembered as a leaf type, as every other leaf's is.
    """
    cls = type(value)
    if cls in _leaf_types:
        return None
    kids = None if is_leaf is not None and is_leaf(value) else _children(value)
    if kids is None:
        _leaf_types.add(cls)
    return kids


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(value, list):
        return list(enumerate(value))
    if isinstance(value, tuple):
        fields = getattr(type(value), "_fields", None)
        if fields is not None:  # namedtuple: paths are field names
            return list(zip(fields, value))
        return list(enumerate(value))
    if isinstance(value, Mapping):
        return [(key, value[key]) for key in sorted_keys(value)]
    attrs_fields = getattr(type(value), "__attrs_attrs__", None)
    if attrs_fields is not None:
        return [(f.name, getattr(value, f.name)) for f in attrs_fields]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, _ATOMIC_SEQUENCES):
        return list(enumerate(value))
    return None


def flatten_with_paths(
    value: Any,
    path: Path = (),
    is_leaf: Callable[[Any], bool] | None = None,
    expand: Callable[[Any], list[tuple[Path, Any]] | None] | None = None,
) -> Iterator[tuple[Path, Any]]:
    """Yields `(path, leaf)` for every leaf of `value`, in `tf.nest` order.

    Args:
        value: The nest.
        path: The path of `value` itself.
        is_leaf: True for objects kept whole even if they are containers.
        expand: `(path, leaf)` pairs for other containers (None: a leaf).
    """
    kids = children(value, is_leaf)
    if kids is None:
        expanded = None if expand is None else expand(value)
        if expanded is None:
            yield path, value
        else:
            for sub_path, leaf in expanded:
                yield path + tuple(sub_path), leaf
        return
    for key, child in kids:
        yield from flatten_with_paths(child, (*path, key), is_leaf, expand)


def path_to_str(path: Path) -> str:
    """Joins a path such as `('layers', 0, 'w')` into `'layers/0/w'`."""
    return "/".join(str(p) for p in path)


def lookup(tree: Mapping[str, Any], path: str) -> Any:
    """`tree["a"]["b"]` for the path `"a/b"` of a nested mapping.

    Raises:
        KeyError: A part of `path` is not there.
    """
    value: Any = tree
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


# ----------------------------------------------------------------------------
# Outputs of `train()` / `evaluate()`: nested mappings of numbers and arrays.


def map_output(fn: Callable[[Any], Any], output: Any) -> Any:
    """Applies `fn` to every leaf of a nested mapping/list/tuple `output`."""
    if isinstance(output, Mapping):
        return {key: map_output(fn, value) for key, value in output.items()}
    if isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        return type(output)(map_output(fn, value) for value in output)
    return fn(output)


def to_numpy_leaf(value: Any) -> Any:
    """Converts one output leaf (any framework's array or a number) to NumPy.

    Python numbers stay Python numbers; anything array-like becomes an
    `np.ndarray` (0-d for scalars). Raises `ProtocolError` for non-numeric leaves.
    """
    if isinstance(value, (bool, numbers.Number)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
    else:
        converted = backends.to_numpy(value)  # a framework's array, by its backend
        if converted is not None:
            array = converted
        elif callable(getattr(value, "numpy", None)):  # looproto.Variable
            array = np.asarray(value.numpy())
        elif hasattr(value, "__array__"):
            array = np.asarray(value)
        else:
            raise ProtocolError(
                f"Output leaves must be numbers or arrays; received {value_repr(value)} "
                f"of type {type(value).__name__}."
            )
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ProtocolError(
            f"Output leaves must be numeric arrays; received an array of dtype "
            f"{array.dtype}: {value_repr(value)}."
        )
    return array


def check_output(output: Any, where: str) -> None:
    """Raises `ProtocolError` unless `output` is None or a nested mapping of numbers."""
    if output is None:
        return
    if not isinstance(output, Mapping):
        raise ProtocolError(
            f"`{where}` must return None or a (possibly nested) mapping of names to "
            f"arrays or numbers; received {value_repr(output)} of type {type(output).__name__}."
        )
    for key, value in output.items():
        if not isinstance(key, str):
            raise ProtocolError(
                f"`{where}` returned a mapping with a non-string key {key!r}; "
                "output names must be strings."
            )
        if isinstance(value, Mapping):
            check_output(value, where)
