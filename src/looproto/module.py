"""`Module` and `Variable`: tf.Module's semantics in pure Python, for any framework.

A `Module` is a named container of state. Its variables and submodules are not
registered anywhere: they are *discovered* by walking the instance's attributes
(sorted by name) and the containers they hold (lists, tuples, dicts by sorted key,
namedtuples, dataclass instances). This is how `tf.Module` works, and its
behaviours are kept, including its real traversal order, so code written against
`tf.Module` ports by changing the import.

Variables of every framework are found: `looproto.Variable` (holding a NumPy or
JAX array), `tf.Variable`, `torch.nn.Parameter` and buffers of a `torch.nn.Module`
held as an attribute, Keras and Flax NNX variables. Framework types are recognised
by the backend adapter of that framework (see `looproto.backends.base.Backend`),
which is loaded only when an object of that framework is met, so this file never
imports a framework.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from looproto import _nest
from looproto.errors import ConfigError, ProtocolError, ShapeError, value_repr

if TYPE_CHECKING:
    from looproto.backends.base import Backend

__all__ = [
    "Module",
    "NameScope",
    "Variable",
    "assign_variable",
    "backend_for_variable",
    "create_global_step",
    "current_name_scope",
    "framework_backends",
    "hooks_gated",
    "name_scope",
    "register_framework",
    "register_hook_gate",
    "register_name_scope_hook",
    "variable_to_numpy",
    "variables_by_path",
]

_F = TypeVar("_F", bound=Callable[..., Any])

# ----------------------------------------------------------------------------
# Name scopes

_local = threading.local()

# Each hook maps the full scope string (e.g. "outer/inner/") to a context manager that
# enters the framework's own scope, so module names show in TF graphs, JAX HLO and
# the torch profiler. Backends register theirs when they load.
_name_scope_hooks: list[Callable[[str], AbstractContextManager[Any]]] = []


def current_name_scope() -> str:
    """Returns the active name scope: `""` at top level, else a string ending in `/`."""
    return getattr(_local, "scope", "")


# Frameworks whose backend mirrors looproto scopes, hooked the first time a scope is
# entered after that framework was imported (no framework is imported for this).
_SCOPE_FRAMEWORKS = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}
_scope_frameworks_hooked: set[str] = set()


def _hook_imported_frameworks() -> None:
    for module_name, backend_name in _SCOPE_FRAMEWORKS.items():
        if module_name in _scope_frameworks_hooked or module_name not in sys.modules:
            continue
        _scope_frameworks_hooked.add(module_name)
        from looproto import backends
        from looproto.errors import BackendNotAvailableError

        if backend_name not in backends.available():
            continue
        try:
            register_name_scope_hook(backends.get(backend_name).name_scope)
        except BackendNotAvailableError:
            continue


def register_name_scope_hook(hook: Callable[[str], AbstractContextManager[Any]]) -> None:
    """Makes every `NameScope` also enter `hook(full_scope_name)`.

    Backends use this to mirror looproto scopes into `tf.name_scope`,
    `jax.named_scope` or `torch.profiler.record_function`.
    """
    if hook not in _name_scope_hooks:
        _name_scope_hooks.append(hook)


# While any of these returns True, looproto runs no framework hook: no framework scope
# is entered and no `Variable` assign hook runs. torch.compile registers
# `torch.compiler.is_compiling`: Dynamo cannot trace other frameworks' hook code
# (`tf.inside_function`, JAX's scopes), and what those hooks guard cannot happen there.
_hook_gates: list[Callable[[], bool]] = []


def register_hook_gate(gate: Callable[[], bool]) -> None:
    """Makes looproto skip every framework hook (name scopes, assign hooks) while `gate()`."""
    if gate not in _hook_gates:
        _hook_gates.append(gate)


def hooks_gated() -> bool:
    """True while a registered gate says framework hooks must not run (see above).

    Name scopes check it themselves; an assign hook that calls into its framework
    checks it first (`Variable.assign` does not: most hooks are a cheap `isinstance`,
    and the check costs more than they do, on every assignment).
    """
    return any(gate() for gate in _hook_gates)


_Entered = list[AbstractContextManager[Any]]


def _entries(scope: NameScope) -> list[tuple[str, _Entered | None]]:
    """This thread's stack of `(previous scope, entered framework scopes)` for `scope`."""
    try:
        by_scope: dict[int, list[tuple[str, _Entered | None]]] = _local.entries
    except AttributeError:
        by_scope = _local.entries = {}
    return by_scope.setdefault(id(scope), [])


class NameScope:
    """A re-entrant context manager that sets the current name scope.

    Entering a scope named `n` inside scope `cur` gives `cur + n + "/"`; a name that
    already ends in `/` is absolute and replaces the current scope; `""` clears it.
    `with scope as s` yields the full scope string. This is `tf.name_scope` in eager
    mode: scopes are never uniquified.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise ProtocolError(
                f"`name` of a name scope must be a string; received {value_repr(name)} "
                f"of type {type(name).__name__}."
            )
        self._name = name

    @property
    def name(self) -> str:
        """The name this scope was built with (for a `Module`, its full scope)."""
        return self._name

    def __enter__(self) -> str:
        if len(_scope_frameworks_hooked) < len(_SCOPE_FRAMEWORKS):
            _hook_imported_frameworks()
        previous = current_name_scope()
        name = self._name
        if not name:
            scope = ""
        elif name.endswith("/"):
            scope = name
        else:
            scope = previous + name + "/"
        frameworks: _Entered | None = None
        if _name_scope_hooks and scope and not hooks_gated():
            # A plain list rather than an ExitStack, and no-op scopes skipped: torch.compile
            # (Dynamo) traces user-defined `__enter__`/`__exit__`, but neither ExitStack's
            # bookkeeping nor `nullcontext`'s methods called directly.
            frameworks = []
            try:
                for hook in _name_scope_hooks:
                    context = hook(scope)
                    if isinstance(context, nullcontext):
                        continue
                    context.__enter__()
                    frameworks.append(context)
            except BaseException:
                _exit_all(frameworks, None, None, None)
                raise
        # What to restore on exit is kept per thread (and per scope object): a module's
        # scope may be entered by several threads at once, which exit in any order.
        _entries(self).append((previous, frameworks))
        _local.scope = scope
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entries = _entries(self)
        previous, frameworks = entries.pop()
        if not entries:
            del _local.entries[id(self)]
        _local.scope = previous
        if frameworks is not None:
            _exit_all(frameworks, exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"NameScope({self._name!r})"


def _exit_all(
    contexts: _Entered,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Exits `contexts` innermost first, all of them even if one raises.

    Their return values are ignored: a framework scope never swallows `exc`.
    """
    if contexts:
        context = contexts.pop()
        try:
            context.__exit__(exc_type, exc, tb)
        finally:
            _exit_all(contexts, exc_type, exc, tb)


def name_scope(name: str) -> NameScope:
    """Returns a `NameScope` for `name` (see `NameScope`).

    Example:
        >>> with name_scope("outer") as outer:
        ...     with name_scope("inner") as inner:
        ...         pass
        >>> outer, inner
        ('outer/', 'outer/inner/')
    """
    return NameScope(name)


# ----------------------------------------------------------------------------
# Framework recognition: which backend understands an object of a foreign type.

# Top-level package of a type -> backends that may recognise it, in order.
_FRAMEWORK_BACKENDS: dict[str, tuple[str, ...]] = {
    "tensorflow": ("tensorflow",),
    "tf_keras": ("tensorflow",),
    "keras": ("tensorflow", "jax", "torch"),
    "torch": ("torch",),
    "torch_xla": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jax",),
    "flax": ("jax",),
}
_backends_for_type: dict[type, tuple[Backend, ...]] = {}


def register_framework(package: str, *backend_names: str) -> None:
    """Declares that objects whose type lives in `package` are understood by `backend_names`.

    Third-party backends call this so their variables are discovered in `Module`s.
    """
    _FRAMEWORK_BACKENDS[package] = tuple(backend_names)
    _backends_for_type.clear()


def _backends_for(obj: Any) -> tuple[Backend, ...]:
    cls = type(obj)
    try:
        return _backends_for_type[cls]
    except KeyError:
        pass
    found: list[Backend] = []
    # The first framework base class decides: a user's `class MLP(torch.nn.Module)` lives
    # in the user's package, but is understood by the torch backend.
    names: tuple[str, ...] = ()
    for base in cls.__mro__:
        names = _FRAMEWORK_BACKENDS.get(getattr(base, "__module__", "").partition(".")[0], ())
        if names:
            break
    if names:
        from looproto import backends  # Lazy: backends/ imports this file.
        from looproto.errors import BackendNotAvailableError

        for name in names:
            # The object exists, so its framework is imported already; a backend
            # that fails to load simply does not recognise it.
            if name not in backends.available():
                continue
            try:
                found.append(backends.get(name))
            except BackendNotAvailableError:
                continue
    result = tuple(found)
    _backends_for_type[cls] = result
    return result


def framework_backends(obj: Any) -> tuple[Backend, ...]:
    """The loaded backends that understand objects of `obj`'s framework (maybe none).

    Never imports a framework that `obj` does not already come from.
    """
    return _backends_for(obj)


def _is_opaque_leaf(obj: Any) -> bool:
    return isinstance(obj, (Module, Variable))


def _expand_framework_container(obj: Any) -> list[tuple[_nest.Path, Any]] | None:
    for backend in _backends_for(obj):
        expanded = backend.expand(obj)
        if expanded is not None:
            return list(expanded)
    return None


_nest.is_opaque_leaf = _is_opaque_leaf
_nest.expand_framework_container = _expand_framework_container


def is_variable(obj: Any) -> bool:
    """Returns True for a `looproto.Variable` or any framework's variable."""
    if isinstance(obj, Variable):
        return True
    return any(backend.is_variable(obj) for backend in _backends_for(obj))


def is_trainable(obj: Any) -> bool:
    """Returns True for a variable whose `trainable` flag (or `requires_grad`) is set."""
    if isinstance(obj, Variable):
        return obj.trainable
    return any(
        backend.is_variable(obj) and backend.is_trainable(obj) for backend in _backends_for(obj)
    )


def backend_for_variable(variable: Any) -> Backend:
    """The backend that reads and writes `variable` (by the type of array it holds).

    Raises:
        ProtocolError: No loaded backend understands `variable`.
    """
    from looproto import backends

    target = variable.value if isinstance(variable, Variable) else variable
    if isinstance(target, (np.ndarray, np.generic)):
        return backends.get("numpy")
    found = _backends_for(target)
    if found:
        return found[0]
    if isinstance(variable, Variable):
        return backends.get("numpy")
    raise ProtocolError(
        f"No backend understands {value_repr(variable)} of type {type(variable).__name__}; "
        f"known frameworks: {sorted(_FRAMEWORK_BACKENDS)}."
    )


def variable_to_numpy(variable: Any) -> np.ndarray[Any, Any]:
    """A host NumPy copy of any framework's variable."""
    return backend_for_variable(variable).to_numpy(variable)


def assign_variable(variable: Any, array: np.ndarray[Any, Any]) -> None:
    """Writes the NumPy `array` into any framework's variable, in place."""
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

    Example:
        >>> w = Variable(np.zeros((2, 3), np.float32), name="w")
        >>> w.name, w.shape, w.dtype
        ('w:0', (2, 3), dtype('float32'))
        >>> _ = w.assign(np.ones((2, 3), np.float32))
        >>> float(w.numpy().sum())
        6.0
    """

    __slots__ = ("__weakref__", "_name", "_trainable", "_value")

    # Called as hook(variable, new_value) before each assignment; backends use it to
    # catch values that must not be stored (e.g. a JAX tracer outside a compiled loop).
    # A hook that returns True has stored the value itself, and `assign` stops there:
    # the TensorFlow backend writes a lifted Variable through to its `tf.Variable`.
    _assign_hooks: ClassVar[list[Callable[[Variable, Any], bool | None]]] = []

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
        self._value = _as_array(initial_value, dtype)
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

    @property
    def value(self) -> Any:
        """The current array. Setting it is `assign`."""
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
        return _numpy_dtype(self._value.dtype)

    def numpy(self) -> np.ndarray[Any, Any]:
        """Returns the value as a NumPy array (a host copy for device arrays)."""
        if isinstance(self._value, (np.ndarray, np.generic)):
            return np.array(self._value)
        return variable_to_numpy(self)  # The framework's backend copies it to the host.

    def assign(self, value: Any) -> Variable:
        """Replaces the value, keeping shape and dtype. Returns the variable.

        Raises:
            ShapeError: `value` has another shape, or a dtype that is not the variable's.
        """
        if self._assign_hooks:
            for hook in self._assign_hooks:
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
            return op(self._value, delta)
        except ValueError as err:  # shapes that do not broadcast
            raise ShapeError(
                f"Cannot update variable {self._name!r} of shape {self.shape} with a value of "
                f"shape {tuple(np.shape(delta))}: {err}"
            ) from err

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        array = np.asarray(self._value)
        if dtype is not None and array.dtype != np.dtype(dtype):
            return array.astype(dtype)
        # NumPy 2 trusts `copy`: `np.array(var)` asks for a copy and must not get
        # the variable's own buffer.
        return array.copy() if copy else array

    def __int__(self) -> int:
        return int(np.asarray(self._value))

    def __float__(self) -> float:
        return float(np.asarray(self._value))

    def __index__(self) -> int:
        return int(np.asarray(self._value))

    def __repr__(self) -> str:
        return (
            f"<looproto.Variable {self._name!r} shape={self.shape} dtype={self.dtype} "
            f"trainable={self._trainable} value={value_repr(self._value, 60)}>"
        )


def _numpy_dtype(dtype: Any) -> np.dtype[Any]:
    """NumPy's dtype for a framework's dtype; torch's (`torch.float32`) go by name."""
    if type(dtype).__module__.partition(".")[0] == "torch":
        # No try/except around `np.dtype(dtype)`: torch.compile cannot trace that.
        return np.dtype(str(dtype).rpartition(".")[2])
    as_numpy = getattr(dtype, "as_numpy_dtype", None)  # a `tf.DType` (NumPy cannot read it)
    if as_numpy is not None:
        converted: np.dtype[Any] = np.dtype(as_numpy)
        return converted
    result: np.dtype[Any] = np.dtype(dtype)
    return result


def create_global_step() -> Variable:
    """Returns a new non-trainable int64 scalar `Variable` named `global_step`, at 0.

    Trainers advance it once per step (`step.assign_add(1)`); the `Controller`
    reads it to decide when to stop, summarise and checkpoint.
    """
    return Variable(np.int64(0), trainable=False, name="global_step")


# ----------------------------------------------------------------------------
# Module

_CAMEL_TO_SNAKE = re.compile(r"((?<=[a-z0-9])[A-Z]|(?!^)[A-Z](?=[a-z]))")
_VALID_IDENTIFIER = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def camel_to_snake(value: str) -> str:
    """`"MyModule"` -> `"my_module"`, `"HTTPServer"` -> `"http_server"` (tf.Module's rule)."""
    return _CAMEL_TO_SNAKE.sub(r"_\1", value).lower()


class Module:
    """Base class for anything that holds state: layers, models, trainers.

    A module has a `name` (given, or its class name in snake_case) and a
    `name_scope` fixed when it is constructed: a module built inside another's
    scope gets a nested scope (`"outer/inner/"`). Methods decorated with
    `Module.with_name_scope` run inside that scope, so the variables they create
    carry the module's name.

    Its `variables`, `trainable_variables`, `non_trainable_variables` and
    `submodules` are found by walking instance attributes in sorted order and the
    containers they hold. Each module lists its own attributes' values first, then
    walks each child module fully before the next (tf.Module's real order, which its
    docstring calls breadth-first). Objects reachable twice are reported once, at
    their first encounter; cycles are safe. Properties and class attributes are
    never evaluated. Attribute names in `_TF_MODULE_IGNORED_PROPERTIES` are skipped.

    Beyond tf.Module, dataclass instances are walked field by field, and framework
    containers (a `torch.nn.Module`, a Keras layer) by their own parameter names.

    Example:
        >>> class Dense(Module):
        ...     def __init__(self, n_in, n_out, name=None):
        ...         super().__init__(name=name)
        ...         with self.name_scope:
        ...             self.w = Variable(np.zeros((n_in, n_out), np.float32), name="w")
        ...             self.b = Variable(np.zeros(n_out, np.float32), name="b")
        >>> class MLP(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         with self.name_scope:
        ...             self.layers = [Dense(2, 3), Dense(3, 1)]
        >>> mlp = MLP()
        >>> [v.name for v in mlp.variables]
        ['mlp/dense/b:0', 'mlp/dense/w:0', 'mlp/dense/b:0', 'mlp/dense/w:0']
        >>> [layer.name_scope.name for layer in mlp.submodules]
        ['mlp/dense/', 'mlp/dense/']
    """

    # Attribute names that discovery skips (kept under tf.Module's name so ported
    # subclasses that extend it keep their meaning).
    _TF_MODULE_IGNORED_PROPERTIES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str | None = None) -> None:
        if name is None:
            name = camel_to_snake(type(self).__name__)
        elif not isinstance(name, str):
            raise ProtocolError(
                f"`name` must be a string; received {value_repr(name)} of type "
                f"{type(name).__name__}."
            )
        elif not _VALID_IDENTIFIER.fullmatch(name):
            raise ConfigError(
                f"{name!r} is not a valid module name. Module names must be valid Python "
                "identifiers (e.g. a valid class name): ASCII letters, digits and `_`, "
                "not starting with a digit."
            )
        self._name = name
        # The trailing "/" makes re-entering the scope absolute: it never nests twice.
        self._name_scope = NameScope(f"{current_name_scope()}{name}/")

    @property
    def name(self) -> str:
        """The module's short name (`name_scope.name` is the full, scoped one)."""
        return self._name

    @property
    def name_scope(self) -> NameScope:
        """The `NameScope` captured at construction; always the same object."""
        return self._name_scope

    @property
    def variables(self) -> tuple[Any, ...]:
        """All variables of this module and its submodules, deduplicated, in walk order."""
        return tuple(self._flatten(predicate=is_variable))

    @property
    def trainable_variables(self) -> tuple[Any, ...]:
        """The variables whose `trainable` flag is set (a subsequence of `variables`)."""
        return tuple(self._flatten(predicate=is_trainable))

    @property
    def non_trainable_variables(self) -> tuple[Any, ...]:
        """The variables whose `trainable` flag is not set (a subsequence of `variables`)."""
        return tuple(self._flatten(predicate=_is_non_trainable))

    @property
    def submodules(self) -> tuple[Module, ...]:
        """All modules reachable from this one (not itself), in tf.Module's order.

        Example:
            >>> a, b, c = Module(name="a"), Module(name="b"), Module(name="c")
            >>> a.b = b
            >>> b.c = c
            >>> [m.name for m in a.submodules]
            ['b', 'c']
        """
        return tuple(self._flatten(predicate=_is_module))

    def _flatten(
        self,
        recursive: bool = True,
        predicate: Callable[[Any], bool] | None = None,
        attribute_traversal_key: Callable[[str], Any] | None = None,
        with_path: bool = False,
    ) -> Iterator[Any]:
        """Yields the leaves of this module's attributes that match `predicate`.

        Args:
            recursive: Also walk into submodules.
            predicate: Keeps a leaf when it returns True; None keeps every leaf.
            attribute_traversal_key: Sort key for attribute names (dict keys inside
                containers are always sorted by themselves).
            with_path: Yield `(path, leaf)` pairs such as `(("layers", 0, "w"), w)`.
                Paths are not deduplicated: a shared object is yielded once per path.
                A module met again on its own ancestor chain is not re-entered.

        Raises:
            ValueError: An attribute could not be walked (e.g. a dict with unsortable
                keys); the message names the attribute.
        """
        if predicate is None:
            predicate = _always
        return _flatten_module(
            self,
            recursive=recursive,
            predicate=predicate,
            attribute_traversal_key=attribute_traversal_key,
            with_path=with_path,
            module_path=(),
            seen={id(self)},
            recursion_stack=[],
        )

    @staticmethod
    def with_name_scope(method: _F) -> _F:
        """Decorates a method so that it runs inside its module's `name_scope`.

        Example:
            >>> class Scale(Module):
            ...     @Module.with_name_scope
            ...     def __call__(self, x):
            ...         if not hasattr(self, "w"):
            ...             self.w = Variable(np.float32(2.0), name="w")
            ...         return self.w.value * x
            >>> s = Scale()
            >>> float(s(3.0)), s.w.name
            (6.0, 'scale/w:0')

        Raises:
            ProtocolError: `method` is not a plain function taking `self` first.
        """
        if not inspect.isfunction(method):
            raise ProtocolError(
                "`with_name_scope` decorates methods (plain functions defined in a class "
                f"body whose first parameter is `self`); received {value_repr(method)} of "
                f"type {type(method).__name__}. For properties, decorate the getter "
                "function and wrap the result in `property`."
            )
        params = list(inspect.signature(method).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            raise ProtocolError(
                f"`with_name_scope` decorates methods, but `{method.__qualname__}` takes no "
                "positional `self` parameter."
            )

        @functools.wraps(method)
        def method_with_name_scope(self: Any, *args: Any, **kwargs: Any) -> Any:
            scope = getattr(self, "name_scope", None) if isinstance(self, Module) else None
            if scope is None:
                raise ProtocolError(
                    f"`{method.__qualname__}` is decorated with `Module.with_name_scope` "
                    f"but was called on {value_repr(self)} of type {type(self).__name__}, "
                    "which is not a `looproto.Module` (or has not run `Module.__init__`)."
                )
            # A new (equivalent) scope object per call: torch.compile can enter a context
            # manager made inside the compiled code, not one made before it.
            with NameScope(scope.name):
                return method(self, *args, **kwargs)

        return method_with_name_scope  # type: ignore[return-value]

    def __repr__(self) -> str:
        # `_name` is missing while a subclass's `__init__` runs before `Module.__init__`.
        name = getattr(self, "_name", None)
        return f"<{type(self).__module__}.{type(self).__qualname__} name={name!r}>"


def _always(_: Any) -> bool:
    return True


def _is_module(obj: Any) -> bool:
    return isinstance(obj, Module)


def _is_non_trainable(obj: Any) -> bool:
    return is_variable(obj) and not is_trainable(obj)


def _flatten_module(
    module: Module,
    recursive: bool,
    predicate: Callable[[Any], bool],
    attribute_traversal_key: Callable[[str], Any] | None,
    with_path: bool,
    module_path: _nest.Path,
    seen: set[int],
    recursion_stack: list[int],
) -> Iterator[Any]:
    # A module already being walked higher up this path: list its leaves, don't recurse.
    if id(module) in recursion_stack:
        recursive = False
    ignored: frozenset[str] = getattr(type(module), "_TF_MODULE_IGNORED_PROPERTIES", frozenset())
    children: list[tuple[_nest.Path, Module]] = []
    for key in sorted(vars(module), key=attribute_traversal_key):
        if key in ignored:
            continue
        prop = vars(module)[key]
        try:
            leaves = list(_nest.flatten_with_paths(prop))
        except Exception as cause:
            raise ConfigError(
                f"Error processing property {key!r} of {value_repr(prop)}: {cause}"
            ) from cause
        for leaf_path, leaf in leaves:
            path = (*module_path, key, *leaf_path)
            if not with_path:
                if id(leaf) in seen:
                    continue
                seen.add(id(leaf))
            if predicate(leaf):
                yield (path, leaf) if with_path else leaf
            if recursive and isinstance(leaf, Module):
                children.append((path, leaf))

    recursion_stack.append(id(module))
    for path, child in children:
        yield from _flatten_module(
            child,
            recursive=recursive,
            predicate=predicate,
            attribute_traversal_key=attribute_traversal_key,
            with_path=with_path,
            module_path=path,
            seen=seen,
            recursion_stack=recursion_stack,
        )
    recursion_stack.pop()


def variables_by_path(root: Any, predicate: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Maps `"a/b/0/w"`-style paths to the variables reachable from `root`.

    `root` is a `Module`, a variable, or a container of them (a dict of modules,
    say). A variable reachable by several paths is listed once, under the first
    path in walk order. This is the key space checkpoints use.

    Args:
        root: Where to start.
        predicate: Which leaves to keep; defaults to variables.
    """
    keep = predicate or is_variable
    found: dict[str, Any] = {}
    seen: set[int] = set()
    if isinstance(root, Module):
        pairs: Iterator[tuple[_nest.Path, Any]] = root._flatten(predicate=keep, with_path=True)
    else:
        pairs = _walk_container(root, keep)
    for path, leaf in pairs:
        if id(leaf) in seen:
            continue
        seen.add(id(leaf))
        found[_nest.path_to_str(path)] = leaf
    return found


def _walk_container(root: Any, keep: Callable[[Any], bool]) -> Iterator[tuple[_nest.Path, Any]]:
    for path, leaf in _nest.flatten_with_paths(root):
        if keep(leaf):
            yield path, leaf
        if isinstance(leaf, Module):
            for sub_path, sub_leaf in leaf._flatten(predicate=keep, with_path=True):
                yield (*path, *sub_path), sub_leaf
