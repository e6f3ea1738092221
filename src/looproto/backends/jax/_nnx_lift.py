"""Flax NNX objects inside the compiled loop: their variables' values ride in the carry.

A trainer holding an `nnx.Module`, an `nnx.Optimizer` or `nnx.Rngs` trains them in
the same `jax.jit(lax.scan)` call as its `looproto.Variable`s (`NnxLift`):

* **On the host, every call**, the NNX objects (the loop's *roots*) are flattened as
  JAX pytrees (NNX's tree mode, ~80 µs for a small model and its optimizer, against
  ~0.6 ms for NNX's graph walk) into their `nnx.Variable`s, each listed once. The
  tree structure -- which includes static attributes such as `Dropout.deterministic`
  -- and the variables' identities are part of the compiled loop's cache key, so
  `model.eval()` or a replaced layer compiles anew instead of training a stale
  graph. Their raw values join the carried state, and come back into the same
  variables after the call (`write_back`).
* **While the step is traced**, NNX's own functional API makes fresh copies of the
  roots (`nnx.split` / `nnx.merge(copy=True)`) holding the scan's tracers: NNX
  allows writes only to objects made in the current trace. The copies are swapped
  into the places where the module holds the roots (an attribute, a list or dict
  entry), so the user's stateful NNX code -- `self.model(x)`,
  `nnx.value_and_grad(loss_fn)(self.model)`, `self.optimizer.update(...)`, Dropout
  drawing from `nnx.Rngs` -- runs unchanged on them; the places get the originals
  back when the trace ends, whatever happens. The copies' new values are the next
  carry. Sharing (tied weights, a layer held twice) survives: `nnx.merge` keeps it.

NNX objects are found as leaves of the module walk, not walked into, and an object a
root holds inside itself is part of the root's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any

import jax

from looproto import _nest
from looproto.backends.jax._variables import nnx_places
from looproto.errors import ConfigError, ProtocolError
from looproto.module import Module


def _nnx() -> Any:
    return sys.modules["flax.nnx"]  # NNX objects exist, so flax.nnx is imported.


def flatten(roots: tuple[Any, ...]) -> tuple[list[Any], Any, tuple[int, ...]]:
    """`(variables, treedef, pattern)`: the distinct `nnx.Variable`s of `roots` in tree
    order, the tree structure, and for each leaf the index of its variable (sharing)."""
    variable_type = _nnx().Variable
    leaves, treedef = jax.tree_util.tree_flatten(
        roots, is_leaf=lambda x: isinstance(x, variable_type)
    )
    index: dict[int, int] = {}
    variables: list[Any] = []
    pattern = []
    for leaf in leaves:
        i = index.get(id(leaf))
        if i is None:
            if not isinstance(leaf, variable_type):
                _refuse_leaf(roots, leaf)
            i = index[id(leaf)] = len(variables)
            variables.append(leaf)
        pattern.append(i)
    return variables, treedef, tuple(pattern)


def _refuse_leaf(roots: tuple[Any, ...], leaf: Any) -> None:
    variable_type = _nnx().Variable
    pairs = jax.tree_util.tree_flatten_with_path(
        roots, is_leaf=lambda x: isinstance(x, variable_type)
    )[0]
    path = next((p for p, x in pairs if x is leaf), None)
    where = "?"
    if path:  # `[i].mask` -> `MyModule.mask`: the root's type, then the path inside it.
        root = roots[getattr(path[0], "idx", 0)]
        where = type(root).__name__ + jax.tree_util.keystr(tuple(path[1:]))
    raise ConfigError(
        f"A Flax NNX object of the module holds {type(leaf).__name__} at `{where}` as data "
        "outside an `nnx.Variable`. The JAX backend's compiled loop carries the values of "
        "`nnx.Variable`s only: wrap it (`nnx.Variable(...)`, `nnx.BatchStat(...)`), or "
        "make it static (`nnx.static(...)`)."
    )


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, Module):
        return vars(node)[key]
    if isinstance(node, Mapping) or (
        isinstance(node, (list, tuple)) and not hasattr(type(node), "_fields")
    ):
        return node[key]
    return getattr(node, key)  # namedtuple, dataclass or attrs field


def _setter(module: Any, path: _nest.Path) -> Callable[[Any], None]:
    """A function putting an object at `path` of `module` (ConfigError where it cannot)."""
    node = module
    for key in path[:-1]:
        node = _child(node, key)
    key = path[-1]
    if isinstance(node, Module):
        attributes = vars(node)
        return lambda value: attributes.__setitem__(key, value)
    if isinstance(node, (MutableMapping, MutableSequence)):
        return lambda value: node.__setitem__(key, value)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return lambda value: object.__setattr__(node, key, value)
    raise ConfigError(
        f"The Flax NNX object at {_nest.path_to_str(path)!r} is held in a "
        f"{type(node).__name__}, where the JAX backend's compiled loop cannot put its "
        "traced copy while the step is traced. Hold it as a Module attribute, or in a list "
        "or dict."
    )


# While a loop traces, where its traced copies sit: `{id(copy): [setter, ...]}`, so that
# `value_and_grad(fn, self.model)` can put its own copies there in turn.
_active = threading.local()

Place = tuple[_nest.Path | None, Any, Callable[[Any], None]]
"""`(path in the module or None, root, setter)`: where a module holds an NNX root."""


def places(module: Any, roots: tuple[Any, ...]) -> list[Place]:
    """Every place where `module` holds one of `roots`, and, for a root that is a copy
    the tracing loop put in place, every place the loop put it.

    So `value_and_grad(fn, self.model)` (`module` a root) or `value_and_grad(fn,
    self.head)` reaches the model wherever the step may read it from.
    """
    found: list[Place] = [
        (path, root, _setter(module, path))
        for path, root in nnx_places(module, list(roots))
        if path  # (not `module` itself)
    ]
    setters: dict[int, list[Any]] = getattr(_active, "setters", {})
    for root in roots:
        found += [(None, root, put) for put in setters.get(id(root), ())]
    return found


@contextlib.contextmanager
def swapped(
    module: Any, where: list[Place], copy_of: dict[int, Any], step_name: str
) -> Iterator[None]:
    """Puts each root's copy (`copy_of[id(root)]`) in its places; restores the roots
    afterwards, and raises if the step replaced a copy meanwhile."""
    setters: dict[int, list[Any]] = getattr(_active, "setters", None) or {}
    _active.setters = setters
    for _, root, put in where:
        put(copy_of[id(root)])
        setters.setdefault(id(copy_of[id(root)]), []).append(put)
    replaced: list[str] = []
    try:
        yield
    finally:
        for path, root, put in where:
            copy = copy_of[id(root)]
            setters.pop(id(copy), None)
            if path is not None and _child_at(module, path) is not copy:
                replaced.append(_nest.path_to_str(path))
            put(root)
    if replaced:
        raise ProtocolError(
            f"`{step_name}` replaced the Flax NNX objects at {replaced} while the JAX backend "
            "traced it; the loop carries the objects it found when the call began. Replace "
            "NNX objects outside the step."
        )


def copies_of(roots: tuple[Any, ...], *states: Any) -> tuple[Any, ...]:
    """Fresh copies of `roots` made in the current trace (NNX lets only those be written).

    With `states` (from `nnx.split(roots, ...)` and the same graph), the copies hold them.
    """
    nnx = _nnx()
    if not states:
        graphdef, *parts = nnx.split(roots)
    else:
        graphdef, parts = states[0], list(states[1:])
    return tuple(nnx.merge(graphdef, *parts, copy=True))


class NnxLift:
    """The NNX objects (`roots`) of one loop call, flattened to their variables."""

    def __init__(self, roots: list[Any]) -> None:
        if not hasattr(_nnx().Variable, "get_raw_value"):
            raise ConfigError(
                "Training Flax NNX objects in the JAX backend's compiled loop needs flax "
                ">= 0.12 (`nnx.Variable.get_raw_value`); upgrade flax, or run the step "
                "eagerly (`StandardTrainerOptions(use_compiled_step=False)`)."
            )
        self.roots = tuple(roots)
        self.variables, self.treedef, self.pattern = flatten(self.roots)
        # What must not change for a compiled loop to be reused: the structure (with
        # static attributes) and which variable sits at each leaf.
        self.key = (self.treedef, self.pattern, *map(id, self.variables))

    def values(self) -> list[Any]:
        """The variables' raw values, for the carry."""
        return [v.get_raw_value() for v in self.variables]

    def write_back(self, values: list[Any]) -> None:
        for variable, value in zip(self.variables, values):
            variable.set_raw_value(value)

    def describe(self, module: Any) -> dict[int, str]:
        """`{id(raw value): path}` of every variable, for error messages (trace time)."""
        paths: dict[int, str] = {}
        nnx = _nnx()
        for path, root in nnx_places(module, list(self.roots)):
            prefix = _nest.path_to_str(path)
            for sub, node in nnx.iter_graph(root):
                if isinstance(node, nnx.Variable):
                    where = "/".join([prefix, *map(str, sub)])
                    paths.setdefault(id(node.get_raw_value()), where)
        return paths

    @contextlib.contextmanager
    def bound(self, module: Any, values: list[Any], step_name: str) -> Iterator[Any]:
        """At trace time: copies of the roots holding `values`, put where `module` holds them.

        Yields the copies (a tuple, like `roots`); `read` takes their new values.
        """
        where = places(module, self.roots)
        copies = copies_of(self.roots)
        variables, _, _ = flatten(copies)
        for variable, value in zip(variables, values):
            variable.set_raw_value(value)
        copy_of = {id(root): copy for root, copy in zip(self.roots, copies)}
        with swapped(module, where, copy_of, step_name):
            yield copies

    def read(self, copies: Any, step_name: str) -> list[Any]:
        """The copies' values after the step; their structure must be the roots'."""
        variables, treedef, pattern = flatten(copies)
        if treedef != self.treedef or pattern != self.pattern:
            raise ProtocolError(
                f"`{step_name}` changed the structure of a Flax NNX object while the JAX "
                "backend traced its compiled loop (added, removed or replaced a variable or "
                "a sub-module, or changed a static attribute such as `deterministic`). The "
                "compiled loop carries a fixed structure: change it outside the step (a new "
                "structure compiles anew on the next call)."
            )
        return [variable.get_raw_value() for variable in variables]


def _child_at(module: Any, path: _nest.Path) -> Any:
    node = module
    for key in path:
        node = _child(node, key)
    return node
