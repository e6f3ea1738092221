"""Private: walking nested containers the way `tf.nest` does, plus output helpers.

`flatten_with_paths` decides what counts as a container when `Module` looks for
variables and submodules: lists and tuples by index, mappings by sorted key,
namedtuples, attrs classes and dataclass instances by field name, and framework
containers (a `torch.nn.Module`, a Keras layer) through their backend's `expand`.
Everything else is a leaf.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from looproto.errors import ProtocolError, value_repr

Path = tuple[Any, ...]

# Types that `collections.abc.Sequence` admits but that are values, not containers.
_ATOMIC_SEQUENCES = (str, bytes, bytearray, memoryview, range)


def _never_opaque(obj: Any) -> bool:
    return False


def _no_expansion(obj: Any) -> list[tuple[Path, Any]] | None:
    return None


# Replaced by `looproto.module` (which knows Modules and backends) to break the import cycle.
is_opaque_leaf: Callable[[Any], bool] = _never_opaque
expand_framework_container: Callable[[Any], list[tuple[Path, Any]] | None] = _no_expansion


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


def children(value: Any) -> list[tuple[Any, Any]] | None:
    """Returns `(path element, child)` pairs if `value` is a container, else None."""
    cls = type(value)
    if cls in _leaf_types:
        return None
    kids = _children(value)
    if kids is None:
        _leaf_types.add(cls)
    return kids


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    if is_opaque_leaf(value):
        return None
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


def flatten_with_paths(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yields `(path, leaf)` for every leaf of `value`, in `tf.nest` order."""
    kids = children(value)
    if kids is None:
        expanded = expand_framework_container(value)
        if expanded is None:
            yield path, value
        else:
            for sub_path, leaf in expanded:
                yield path + tuple(sub_path), leaf
        return
    for key, child in kids:
        yield from flatten_with_paths(child, (*path, key))


def path_to_str(path: Path) -> str:
    """Joins a path such as `('layers', 0, 'w')` into `'layers/0/w'`."""
    return "/".join(str(p) for p in path)


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
        convert = getattr(value, "numpy", None)
        if callable(convert):  # tf.Tensor, tf.Variable, looproto.Variable, torch (cpu)
            try:
                array = np.asarray(convert())
            except (TypeError, RuntimeError):  # torch tensors that need detach/cpu
                array = np.asarray(value.detach().cpu().numpy())
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
