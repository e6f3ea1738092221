"""`Variable`, and the questions the core asks about any framework's variables.

`Variable` is looproto's own named, mutable array (NumPy by default; JAX and torch
arrays inside their backends' loops). `is_variable`, `is_trainable`,
`variable_to_numpy` and `assign_variable` answer for every framework's variables,
through the backend registry (`looproto.backends.for_object`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from looproto import backends
from looproto.backends.base import Backend
from looproto.errors import ProtocolError, ShapeError, value_repr
from looproto.module import _tree
from looproto.module._scope import current_name_scope
from looproto.module._tree import TreeLeaf

_assign_hooks = backends.assign_hooks
_read_hooks = backends.read_hooks

__all__ = [
    "TreeVariable",
    "Variable",
    "assign_variable",
    "backend_for_variable",
    "create_global_step",
    "is_trainable",
    "is_variable",
    "read_int",
    "variable_to_numpy",
]


def is_variable(obj: Any) -> bool:
    """Returns True for a `looproto.Variable` or any framework's variable."""
    if isinstance(obj, Variable):
        return True
    return any(backend.is_variable(obj) for backend in backends.for_object(obj))


def is_trainable(obj: Any) -> bool:
    """Returns True for a variable whose `trainable` flag (or `requires_grad`) is set."""
    if isinstance(obj, Variable):
        return obj.trainable
    return any(
        backend.is_variable(obj) and backend.is_trainable(obj)
        for backend in backends.for_object(obj)
    )


def backend_for_variable(variable: Any) -> Backend:
    """The backend that reads and writes `variable` (by the type of array it holds).

    Raises:
        ProtocolError: No loaded backend understands `variable`.
    """
    target = variable.value if isinstance(variable, Variable) else variable
    if isinstance(variable, TreeVariable):  # A tree's backend is its (first) leaves'.
        target = next((leaf for _, leaf in _tree.leaves_with_paths(target)), np.zeros(()))
    if isinstance(target, (np.ndarray, np.generic)):
        return backends.get("numpy")
    found = backends.for_object(target)
    for backend in found:  # A package several backends understand (Keras): the owner's.
        if backend.is_variable(target):
            return backend
    if found:
        return found[0]
    if isinstance(variable, Variable):
        return backends.get("numpy")
    raise ProtocolError(
        f"No backend understands {value_repr(variable)} of type {type(variable).__name__}; "
        f"registered backends: {backends.available()}."
    )


def variable_to_numpy(variable: Any) -> Any:
    """A host NumPy copy of any framework's variable (a tree of them for a `TreeVariable`)."""
    if isinstance(variable, (TreeVariable, TreeLeaf)):
        return variable.numpy()
    return backend_for_variable(variable).to_numpy(variable)


def assign_variable(variable: Any, array: Any) -> None:
    """Writes the NumPy `array` (a tree of them for a `TreeVariable`) into any variable."""
    if isinstance(variable, (TreeVariable, TreeLeaf)):
        variable.assign(array)
        return
    backend_for_variable(variable).assign(variable, array)


# ----------------------------------------------------------------------------
# Variable


def _as_array(value: Any, dtype: Any = None) -> Any:
    """NumPy for Python values and NumPy input; framework arrays are kept as they are."""
    if isinstance(value, Variable):
        value = value.value
    if dtype is not None:
        if isinstance(value, np.ndarray) or not hasattr(value, "dtype"):
            return np.array(value, dtype=dtype)
        return value.astype(dtype)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, np.generic) or not (hasattr(value, "shape") and hasattr(value, "dtype")):
        array = np.asarray(value)
        if array.dtype == object:
            raise ProtocolError(
                f"`initial_value` must be a number or an array; received {value_repr(value)}."
            )
        return array
    return value  # jax.Array, a tracer, or another framework's array


class Variable:
    """A named, mutable array: the state `Module` discovers and checkpoints save.

    It holds a NumPy array by default; the JAX backend keeps `jax.Array`s in it.
    Its name is taken from the active name scope when it is created, so a variable
    made inside a module's `name_scope` is named like `"my_module/w:0"`.

    `assign` (and setting `.value`) keeps the variable's shape and dtype: an array
    of another shape or dtype raises `ShapeError` instead of silently changing the
    model. Python numbers are cast to the variable's dtype when that is safe.

    An `initial_value` that is a pytree of arrays -- dicts, lists, tuples and
    namedtuples holding arrays, such as an optax optimizer state -- makes a
    `TreeVariable` (see there): one variable, checkpointed leaf by leaf.

    Compared with a number or an array, a variable compares its value elementwise, as a
    `tf.Variable` does (`create_global_step() == 0` is a true NumPy bool); compared with
    another `Variable`, `==` is identity, and a variable hashes by identity, so lists,
    sets and dicts of variables work for variables of any shape.

    Example:
        >>> w = Variable(np.zeros((2, 3), np.float32), name="w")
        >>> w.name, w.shape, w.dtype
        ('w:0', (2, 3), dtype('float32'))
        >>> _ = w.assign(np.ones((2, 3), np.float32))
        >>> float(w.numpy().sum())
        6.0
    """

    __slots__ = ("__weakref__", "_name", "_trainable", "_value")

    def __new__(cls, initial_value: Any = None, *args: Any, **kwargs: Any) -> Variable:
        if cls is Variable and _tree.is_tree(initial_value):
            cls = TreeVariable
        return object.__new__(cls)

    def __init__(
        self,
        initial_value: Any,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise ProtocolError(
                f"`name` must be a string or None; received {value_repr(name)} "
                f"of type {type(name).__name__}."
            )
        if not isinstance(trainable, (bool, np.bool_)):
            raise ProtocolError(
                f"`trainable` must be a bool; received {value_repr(trainable)} "
                f"of type {type(trainable).__name__}."
            )
        self._value = self._convert(initial_value, dtype)
        self._trainable = bool(trainable)
        self._name = f"{current_name_scope()}{name or 'Variable'}:0"

    @property
    def name(self) -> str:
        """The full name, with the name scope it was created in, e.g. `"mlp/w:0"`."""
        return self._name

    @property
    def trainable(self) -> bool:
        """Whether optimisers should update this variable."""
        return self._trainable

    _convert = staticmethod(_as_array)

    @property
    def value(self) -> Any:
        """The current array. Setting it is `assign`."""
        # A backend that is tracing a compiled step checks each read (`read_hooks`):
        # a Variable it did not lift would be baked into the program as a constant.
        if _read_hooks:
            for hook in _read_hooks:
                hook(self)
        return self._value

    @value.setter
    def value(self, new_value: Any) -> None:
        self.assign(new_value)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the held array."""
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The NumPy dtype of the held array (`torch.float32` reads as `float32`)."""
        return backends.numpy_dtype(self._value.dtype)

    def numpy(self) -> np.ndarray[Any, Any]:
        """Returns the value as a NumPy array (a host copy for device arrays)."""
        value = self.value
        if isinstance(value, (np.ndarray, np.generic)):
            return np.array(value)
        array: np.ndarray[Any, Any] = variable_to_numpy(self)  # a host copy, by its backend
        return array

    def assign(self, value: Any) -> Variable:
        """Replaces the value, keeping shape and dtype. Returns the variable.

        Raises:
            ShapeError: `value` has another shape, or a dtype that is not the variable's.
        """
        # The loaded backends' `on_assign` hooks (`looproto.backends.SupportsHooks`): they
        # catch values that must not be stored (a JAX tracer outside a compiled loop), and
        # one that returns True has stored the value itself (the TensorFlow backend writes
        # a lifted Variable through to its `tf.Variable`).
        if _assign_hooks:
            for hook in _assign_hooks:
                if hook(self, value):
                    return self
        current = self._value
        # Fast path, once per step in most trainers (`step.assign_add(1)`, a loss): a
        # NumPy scalar of exactly the dtype of a NumPy scalar variable.
        if type(current) is np.ndarray and current.ndim == 0:
            if isinstance(value, np.generic) and value.dtype == current.dtype:
                self._value = np.asarray(value)
                return self
            if type(value) is float and current.dtype.kind == "f":
                self._value = np.asarray(value, dtype=current.dtype)
                return self
        if isinstance(value, Variable):
            value = value.value
        if isinstance(value, np.ndarray):
            value = value.copy()  # Never alias the caller's (or another variable's) buffer.
        elif not hasattr(value, "dtype") or isinstance(value, np.generic):
            if not isinstance(current.dtype, np.dtype):
                # A framework array whose dtypes are not NumPy's (a torch tensor): its
                # backend checks the number and writes it in place, on the array's
                # device, without NumPy (so torch.compile can trace it).
                backend_for_variable(self).assign(self, value)
                return self
            array = np.asarray(value)
            if not np.can_cast(array.dtype, self.dtype, casting="same_kind"):
                raise ShapeError(
                    f"Cannot assign {value_repr(value)} (dtype {array.dtype}) to variable "
                    f"{self._name!r} of dtype {self.dtype}: expected a value of that dtype."
                )
            value = np.asarray(array, dtype=current.dtype)
        if tuple(value.shape) != tuple(current.shape):
            raise ShapeError(
                f"Cannot assign a value of shape {tuple(value.shape)} to variable "
                f"{self._name!r} of shape {tuple(current.shape)}: the shape of a variable "
                "is fixed when it is created."
            )
        if value.dtype != current.dtype:
            raise ShapeError(
                f"Cannot assign a value of dtype {value.dtype} to variable {self._name!r} "
                f"of dtype {current.dtype}: cast it first (e.g. `value.astype(var.dtype)`)."
            )
        self._value = value
        return self

    def assign_add(self, delta: Any) -> Variable:
        """Adds `delta` to the value (same rules as `assign`). Returns the variable."""
        return self.assign(self._combine(operator.add, delta))

    def assign_sub(self, delta: Any) -> Variable:
        """Subtracts `delta` from the value (same rules as `assign`). Returns the variable."""
        return self.assign(self._combine(operator.sub, delta))

    def _combine(self, op: Callable[[Any, Any], Any], delta: Any) -> Any:
        if isinstance(delta, Variable):
            delta = delta.value
        try:
            return op(self.value, delta)
        except ValueError as err:  # shapes that do not broadcast
            raise ShapeError(
                f"Cannot update variable {self._name!r} of shape {self.shape} with a value of "
                f"shape {tuple(np.shape(delta))}: {err}"
            ) from err

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        array = np.asarray(self.value)
        if dtype is not None and array.dtype != np.dtype(dtype):
            return array.astype(dtype)
        # NumPy 2 trusts `copy`: `np.array(var)` asks for a copy and must not get
        # the variable's own buffer.
        return array.copy() if copy else array

    # Comparisons. Against a number or an array, elementwise on the value, as
    # `tf.Variable`'s are (`create_global_step() == 0` is a true NumPy bool; inside a
    # compiled loop the backend's tensor compares). Against another `Variable`, `==`
    # and `!=` are identity: containers, `in`, `list.index`, weak-key dicts and
    # discovery's bookkeeping keep working for variables of any shape (an elementwise
    # answer there has no single truth value). `tf.Variable` answers elementwise and
    # is unhashable; a `Variable` hashes by identity, which agrees with this `==`.

    def __eq__(self, other: object) -> Any:
        if isinstance(other, Variable):
            return self is other
        return self.value == other

    def __ne__(self, other: object) -> Any:
        if isinstance(other, Variable):
            return self is not other
        return self.value != other

    __hash__ = object.__hash__

    def __lt__(self, other: Any) -> Any:
        return self.value < _unwrap(other)

    def __le__(self, other: Any) -> Any:
        return self.value <= _unwrap(other)

    def __gt__(self, other: Any) -> Any:
        return self.value > _unwrap(other)

    def __ge__(self, other: Any) -> Any:
        return self.value >= _unwrap(other)

    def __int__(self) -> int:
        return int(np.asarray(self.value))

    def __float__(self) -> float:
        return float(np.asarray(self.value))

    def __index__(self) -> int:
        return int(np.asarray(self.value))

    def __repr__(self) -> str:
        return (
            f"<looproto.Variable {self._name!r} shape={self.shape} dtype={self.dtype} "
            f"trainable={self._trainable} value={value_repr(self._value, 60)}>"
        )


class TreeVariable(Variable):
    """A `Variable` holding a pytree of arrays: an optimizer state, a dict of parameters.

    `Variable(tree)` makes one when its value is a dict, a namedtuple, or a list or
    tuple holding arrays, dicts or namedtuples (a list of numbers stays one array).
    It is one variable -- discovered, lifted into compiled loops and differentiated
    whole -- and each leaf is checkpointed on its own, under the variable's path and
    the leaf's (`"opt_state/0/mu/w"`: dict keys, namedtuple fields, indices).

    * `.value` is the tree; `.shape` and `.dtype` are trees of the same structure
      holding each leaf's shape and NumPy dtype; `numpy()` is a tree of host copies.
    * `assign(tree)` takes a tree of the same structure (container types, keys,
      lengths) whose leaves have the same shapes and dtypes (Python numbers are
      cast when safe); anything else raises `ShapeError` naming the leaf's path.
      `assign_add`/`assign_sub` and conversions to one array or number raise.

    Example:
        >>> v = Variable({"w": np.zeros((2, 3), np.float32), "step": 0}, name="state")
        >>> v.shape, v.dtype["step"]
        ({'step': (), 'w': (2, 3)}, dtype('int64'))
        >>> _ = v.assign({"w": np.ones((2, 3), np.float32), "step": 1})
        >>> float(v.numpy()["w"].sum())
        6.0
    """

    __slots__ = ()

    @staticmethod
    def _convert(value: Any, dtype: Any = None) -> Any:
        return _tree.from_value(value, lambda leaf: _as_array(leaf, dtype))

    @property
    def shape(self) -> Any:
        """Each leaf's shape, in a tree of the value's structure."""
        return _tree.map_leaves(lambda leaf: tuple(leaf.shape), self._value)

    @property
    def dtype(self) -> Any:
        """Each leaf's NumPy dtype, in a tree of the value's structure."""
        return _tree.map_leaves(lambda leaf: backends.numpy_dtype(leaf.dtype), self._value)

    def numpy(self) -> Any:
        """Host NumPy copies of the leaves, in a tree of the value's structure."""
        return _tree.map_leaves(_tree.leaf_to_numpy, self.value)

    def assign(self, value: Any) -> Variable:
        """Replaces the tree, keeping its structure, shapes and dtypes. Returns the variable.

        Raises:
            ShapeError: `value` differs in structure, or a leaf in shape or dtype.
        """
        if _assign_hooks:
            for hook in _assign_hooks:
                if hook(self, value):
                    return self
        if isinstance(value, Variable):
            value = value.value
        self._value = _tree.checked_like(self._value, value, self._name)
        return self

    def leaves(self) -> dict[str, TreeLeaf]:
        """Each leaf, by its path in the tree (`"0/mu/w"`), as a `TreeLeaf` to read or write."""
        return {
            _tree.path_str(path): TreeLeaf(self, path)
            for path, _ in _tree.leaves_with_paths(self._value)
        }

    def _assign_leaf(self, path: _tree.Path, array: Any) -> None:
        # Through a one-array Variable, so its backend's rules apply (dtype casts,
        # device, sharding, typed keys); only the containers on the path are rebuilt.
        single = Variable(_tree.leaf_at(self._value, path), trainable=False)
        assign_variable(single, array)
        self._value = _tree.replace_leaf(self._value, path, single._value)

    def _combine(self, op: Callable[[Any, Any], Any], delta: Any) -> Any:
        raise ProtocolError(
            f"`assign_add`/`assign_sub` update one array; variable {self._name!r} holds a "
            "tree. Compute the new tree and `assign` it."
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        raise ProtocolError(
            f"Variable {self._name!r} holds a tree, not one array; read `.value` or `numpy()`."
        )

    def __int__(self) -> int:
        return int(self.__array__())

    def __float__(self) -> float:
        return float(self.__array__())

    def __index__(self) -> int:
        return int(self.__array__())

    def __repr__(self) -> str:
        leaves = sum(1 for _ in _tree.leaves_with_paths(self._value))
        return (
            f"<looproto.Variable {self._name!r} tree={type(self._value).__name__} "
            f"leaves={leaves} trainable={self._trainable} value={value_repr(self._value, 60)}>"
        )


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variable) else value


def create_global_step() -> Variable:
    """Returns a new non-trainable int64 scalar `Variable` named `global_step`, at 0.

    Trainers advance it once per step (`step.assign_add(1)`); the `Controller`
    reads it to decide when to stop, summarise and checkpoint.
    """
    return Variable(np.int64(0), trainable=False, name="global_step")


def read_int(value: Any) -> int:
    """The integer in a step counter: a Python or NumPy int, or any framework's scalar variable.

    Example:
        >>> step = create_global_step()
        >>> _ = step.assign_add(3)
        >>> read_int(step), read_int(np.int64(4))
        (3, 4)
    """
    if isinstance(value, Variable):
        return int(value.value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return int(variable_to_numpy(value))
