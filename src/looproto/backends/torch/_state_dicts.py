"""Objects checkpointed through their own `state_dict()`: LR schedulers, `GradScaler`, ...

An LR scheduler (the inner schedulers of `SequentialLR` and `ChainedScheduler` too), a
`torch.amp.GradScaler`, and any other torch object with `state_dict()` and
`load_state_dict()` that is not a module, an optimizer or a data loader is saved whole.
Its `state_dict()` is walked recursively:

* a number, a non-empty list of numbers, a tensor or a numeric NumPy array is a
  variable (`StateEntryView`),
  keyed by the dict keys and list indices leading to it, leading underscores dropped
  (`schedulers/0/last_epoch`, `growth_tracker`);
* booleans, strings and None go, together, into one JSON object state at `json`
  (`JSONState`): `ReduceLROnPlateau`'s `mode`, a scheduler's flags;
* a function is code that the object's constructor sets, not state: torch itself
  leaves a `LambdaLR`'s functions out (and puts a callable *object*'s `__dict__` in);
* anything else -- or a `state_dict()` that raises -- makes the object `Unsaveable`:
  the tree still walks, but saving it raises, naming the object and the entry.

A restore writes each value back through `load_state_dict()` of the whole dict with
that value replaced, so the object's own rules apply (a `GradScaler` refills its scale
tensor, `SequentialLR` hands each inner scheduler its part).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch

from looproto.backends.base import Unsaveable
from looproto.backends.torch._tensors import (
    from_python,
    like_python,
    to_numpy_tensor,
    write_tensor,
)
from looproto.backends.torch._views import View
from looproto.errors import CheckpointError, value_repr

__all__ = [
    "GroupJSONState",
    "JSONState",
    "StateDictRecord",
    "is_array_entry",
    "is_json_entry",
    "is_state_dict_object",
    "state_dict_pairs",
]

_Keys = tuple[Any, ...]
_Pairs = list[tuple[tuple[Any, ...], Any]]
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)
JSON_LEAF = "json"  # The path of an object's JSON part (`<object>/json`).


def is_state_dict_object(obj: Any) -> bool:
    """A torch object saved through `state_dict()` (not a module, optimizer or tensor)."""
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler)):
        return True
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor, type)):
        return False
    if type(obj).__module__.startswith("torchdata."):
        return False  # A data position: `_data.iterator_state` keeps it as JSON.
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def is_array_entry(value: Any) -> bool:
    """A tensor, a number, a numeric NumPy array, or a non-empty list/tuple of numbers."""
    if _is_number(value) or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    return isinstance(value, (list, tuple)) and bool(value) and all(map(_is_number, value))


def is_json_entry(value: Any) -> bool:
    """A value the JSON item holds as it is (the non-numeric state of an object)."""
    return value is None or isinstance(value, (bool, str))


def _is_empty(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) and not value


def path_names(keys: list[Any]) -> dict[Any, Any]:
    """Each dict key's path element: leading underscores dropped, unless names collide."""
    names = {key: (key.lstrip("_") or key) if isinstance(key, str) else key for key in keys}
    taken = list(names.values())
    return {key: key if taken.count(name) > 1 else name for key, name in names.items()}


class StateDictRecord:
    """Reads an object's `state_dict()` and writes values back by `load_state_dict()`."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def read(self, keys: _Keys) -> Any:
        value = self.obj.state_dict()
        for key in keys:
            value = value[key]
        return value

    def write(self, updates: dict[_Keys, Any]) -> None:
        state = self.obj.state_dict()
        for keys, value in updates.items():
            state = _replaced(state, keys, value)
        self.obj.load_state_dict(state)


def _replaced(container: Any, keys: _Keys, value: Any) -> Any:
    """A copy of `container` whose entry at `keys` is `value` (only the path is copied)."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(container, dict):
        copy = dict(container)
        copy[head] = _replaced(container[head], rest, value)
        return copy
    items = list(container)
    items[head] = _replaced(items[head], rest, value)
    return tuple(items) if isinstance(container, tuple) else items


class StateEntryView(View):
    """A number, list of numbers or tensor inside an object's `state_dict()`."""

    __slots__ = ("_keys", "_record")

    def __init__(self, record: StateDictRecord, keys: _Keys, name: str) -> None:
        super().__init__(name)
        self._record = record
        self._keys = keys

    def _get(self) -> Any:
        value = self._record.read(self._keys)
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return value
        array = from_python(value)
        return array[()] if array.ndim == 0 else array

    def _write(self, value: Any) -> None:
        current = self._record.read(self._keys)
        array = to_numpy_tensor(value) if isinstance(value, torch.Tensor) else np.asarray(value)
        if isinstance(current, torch.Tensor):
            new: Any = current.detach().clone()
            write_tensor(new, array, self._name)
        elif isinstance(current, np.ndarray):
            if array.shape != current.shape:
                raise CheckpointError(
                    f"{self._name!r} has shape {current.shape}; cannot write an array of "
                    f"shape {array.shape} into it."
                )
            new = array.astype(current.dtype)
        else:
            if array.shape != np.shape(from_python(current)):
                raise CheckpointError(
                    f"{self._name!r} holds {value_repr(current)}; cannot write an array of "
                    f"shape {array.shape} into it."
                )
            new = like_python(current, array)
        self._record.write({self._keys: new})


class JSONState:
    """The booleans, strings and Nones of an object's `state_dict()`, as one JSON object.

    Follows the iterator-state protocol, so checkpoints keep it in their JSON item:
    `{"schedulers/0/is_initial": false, "mode": "min", ...}`.
    """

    __slots__ = ("_entries", "_name", "_record")

    def __init__(self, record: StateDictRecord, entries: dict[str, _Keys], name: str) -> None:
        self._record = record
        self._entries = entries  # path text -> keys in the state_dict
        self._name = name

    def get_state(self) -> dict[str, Any]:
        """The entries, by path."""
        return {path: self._record.read(keys) for path, keys in self._entries.items()}

    def set_state(self, state: Any) -> None:
        """Writes the entries back through `load_state_dict()`."""
        if not isinstance(state, dict) or set(state) != set(self._entries):
            have = sorted(state) if isinstance(state, dict) else value_repr(state)
            raise CheckpointError(
                f"The non-numeric state of {self._name!r} has the entries {have}; the live "
                f"object has {sorted(self._entries)}."
            )
        bad = [p for p, value in state.items() if not (is_json_entry(value) or _is_empty(value))]
        if bad:
            raise CheckpointError(
                f"The non-numeric state of {self._name!r} holds values of the wrong kind at "
                f"{bad}; expected booleans, strings or None."
            )
        updates = {}
        for path, value in state.items():
            keys = self._entries[path]
            if _is_empty(value):  # JSON has no tuples: an empty one comes back as a list.
                value = type(self._record.read(keys))()
            updates[keys] = value
        self._record.write(updates)


class GroupJSONState:
    """An optimizer's flags, strings and Nones in its param groups, as one JSON object.

    `{"param_groups/0/amsgrad": false, "param_groups/0/foreach": null, ...}`: what
    `Optimizer.state_dict()` keeps beyond numbers, restored into the groups.
    """

    __slots__ = ("_entries", "_name", "_optimizer")

    def __init__(
        self, optimizer: torch.optim.Optimizer, entries: dict[str, tuple[int, str]], name: str
    ) -> None:
        self._optimizer = optimizer
        self._entries = entries  # path text -> (group index, key)
        self._name = name

    def get_state(self) -> dict[str, Any]:
        """The entries, by path (tuples as lists)."""
        groups = self._optimizer.param_groups
        state = {}
        for path, (index, key) in self._entries.items():
            value = groups[index][key]
            state[path] = list(value) if isinstance(value, tuple) else value
        return state

    def set_state(self, state: Any) -> None:
        """Writes the entries back into the param groups."""
        if not isinstance(state, dict) or set(state) != set(self._entries):
            have = sorted(state) if isinstance(state, dict) else value_repr(state)
            raise CheckpointError(
                f"The param-group flags of {self._name!r} have the entries {have}; the live "
                f"optimizer has {sorted(self._entries)}."
            )
        groups = self._optimizer.param_groups
        for path, value in state.items():  # All checked before any is written.
            index, key = self._entries[path]
            current = groups[index][key]
            ok = is_json_entry(value) or (
                isinstance(value, list) and isinstance(current, (list, tuple))
            )
            if not ok:
                raise CheckpointError(
                    f"The param-group entry {path!r} of {self._name!r} holds "
                    f"{value_repr(value)}; the live optimizer has {value_repr(current)}."
                )
        for path, value in state.items():
            index, key = self._entries[path]
            current = groups[index][key]
            groups[index][key] = tuple(value) if isinstance(current, tuple) else value


def state_dict_pairs(obj: Any, name: str) -> _Pairs:
    """`(path, leaf)` pairs of everything `obj.state_dict()` holds (see the module docstring)."""
    label = type(obj).__name__
    try:
        state = obj.state_dict()
    except Exception as err:
        return [
            (
                (),
                Unsaveable(
                    f"{label}.state_dict() raised {type(err).__name__}: {err}. looproto saves "
                    f"a {label} through its state_dict(); fix the error, or keep the object "
                    "out of the checkpointed tree (hold it where `Module` discovery does not "
                    "look, e.g. in a name listed in `_TF_MODULE_IGNORED_PROPERTIES`)."
                ),
            )
        ]
    record = StateDictRecord(obj)
    pairs: _Pairs = []
    texts: dict[str, _Keys] = {}

    def visit(value: Any, keys: _Keys, path: tuple[Any, ...]) -> None:
        where = "/".join(map(str, path))
        if is_array_entry(value):
            pairs.append((path, StateEntryView(record, keys, f"{name}/{where}")))
        elif is_json_entry(value) or _is_empty(value):
            if path:  # An empty `state_dict()` (a disabled `GradScaler`'s) holds nothing.
                texts[where] = keys
        elif isinstance(value, _CODE):
            return  # Code the constructor sets (torch itself stores no function).
        elif isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
            names = path_names(list(value))
            for key in value:
                visit(value[key], (*keys, key), (*path, names[key]))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, (*keys, index), (*path, index))
        else:
            pairs.append(
                (
                    path,
                    Unsaveable(
                        f"the entry {where!r} of {label}.state_dict() holds {value_repr(value)} "
                        f"of type {type(value).__name__}, which a checkpoint cannot hold "
                        "(numbers, tensors, booleans, strings, None, and lists and dicts of "
                        f"them). Keep such state in a tensor or a number, or keep the {label} "
                        "out of the checkpointed tree."
                    ),
                )
            )

    visit(state, (), ())
    if texts:
        json_path = JSON_LEAF if not any(p[:1] == (JSON_LEAF,) for p, _ in pairs) else "json_"
        pairs.append(((json_path,), JSONState(record, texts, f"{name}/{json_path}")))
    return sorted(pairs, key=lambda pair: "/".join(map(str, pair[0])))
