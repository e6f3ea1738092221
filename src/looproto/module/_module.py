"""`Module`: tf.Module's semantics in pure Python, for any framework.

A `Module` is a named container of state. Its variables and submodules are not
registered anywhere: they are *discovered* by walking the instance's attributes
(sorted by name) and the containers they hold (lists, tuples, dicts by sorted key,
namedtuples, dataclass instances). This is how `tf.Module` works, and its
behaviours are kept, including its real traversal order, so code written against
`tf.Module` ports by changing the import.

Variables of every framework are found: `looproto.Variable` (holding a NumPy or
JAX array), `tf.Variable`, `torch.nn.Parameter` and buffers of a `torch.nn.Module`
held as an attribute, Keras and Flax NNX variables. Framework types are recognised,
and their containers walked, by the backend of that framework (see
`looproto.backends.for_object`), which is loaded only when an object of that
framework is met, so this file never imports a framework.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from looproto import _nest, backends
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module._scope import NameScope, current_name_scope
from looproto.module._variable import Variable, is_trainable, is_variable

__all__ = ["Module", "camel_to_snake", "variables_by_path"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _is_opaque_leaf(obj: Any) -> bool:
    return isinstance(obj, (Module, Variable))


def _expand_framework_container(obj: Any) -> list[tuple[_nest.Path, Any]] | None:
    for backend in backends.for_object(obj):
        expanded = backend.expand(obj)
        if expanded is not None:
            return list(expanded)
    return None


def _leaves(value: Any, expand: bool = True) -> Iterator[tuple[_nest.Path, Any]]:
    """`(path, leaf)` of `value` as discovery sees it: Modules and Variables are leaves,
    framework containers are walked by their backend (or are leaves, unless `expand`)."""
    return _nest.flatten_with_paths(
        value, (), _is_opaque_leaf, _expand_framework_container if expand else None
    )


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
        >>> import numpy as np
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
        expand: bool = True,
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
            expand: Walk framework containers (a `torch.nn.Module`, a Flax NNX module)
                through their backend; if False they are leaves, offered to `predicate`.

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
            expand=expand,
            module_path=(),
            seen={id(self)},
            recursion_stack=[],
        )

    @staticmethod
    def with_name_scope(method: _F) -> _F:
        """Decorates a method so that it runs inside its module's `name_scope`.

        Example:
            >>> import numpy as np
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
    expand: bool,
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
            leaves = list(
                _nest.flatten_with_paths(
                    prop, (), _is_opaque_leaf, _expand_framework_container if expand else None
                )
            )
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
            expand=expand,
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
    for path, leaf in _leaves(root):
        if keep(leaf):
            yield path, leaf
        if isinstance(leaf, Module):
            for sub_path, sub_leaf in leaf._flatten(predicate=keep, with_path=True):
                yield (*path, *sub_path), sub_leaf
