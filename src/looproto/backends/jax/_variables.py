"""What the JAX backend lifts into traced code: `looproto.Variable`s and Flax NNX objects.

The compiled loop and `value_and_grad` carry a module's `looproto.Variable`s (arrays or
pytrees) as values, and the Flax NNX objects it holds (`nnx.Module`, `nnx.Optimizer`,
`nnx.Rngs`, a lone `nnx.Variable`) as the state of their `nnx.Variable`s
(`_nnx_lift.py`). `loop_state` is the walk the loop runs on every call: NNX objects
are not walked into (NNX's own graph walk costs ~0.3 ms for a small model), only
found. `module_state` is the same with paths, for gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from looproto import _nest
from looproto.backends.jax._nnx import is_nnx_node
from looproto.module import Module, Variable


def is_loop_state(obj: Any) -> bool:
    return isinstance(obj, Variable) or is_nnx_node(obj)


def _stop(obj: Any) -> bool:
    return isinstance(obj, Module) or is_loop_state(obj)


def pairs(
    module: Any, predicate: Callable[[Any], bool] = is_loop_state
) -> list[tuple[_nest.Path, Any]]:
    """`(path, leaf)` for every leaf of `module` matching `predicate`; NNX objects are
    leaves, not walked into. Paths are `variables_by_path`'s; an object reachable twice
    is listed at each path."""
    if isinstance(module, Module):
        return list(module._flatten(predicate=predicate, with_path=True, expand=False))
    found: list[tuple[_nest.Path, Any]] = []
    for path, leaf in _nest.flatten_with_paths(module, is_leaf=_stop):
        if predicate(leaf):
            found.append((path, leaf))
        if isinstance(leaf, Module):
            for sub, obj in leaf._flatten(predicate=predicate, with_path=True, expand=False):
                found.append(((*path, *sub), obj))
    return found


def module_state(module: Any) -> tuple[dict[str, Variable], dict[str, Any]]:
    """`{path: looproto.Variable}` and `{path: NNX object}` of `module`, each listed once."""
    variables: dict[str, Variable] = {}
    nnx_objects: dict[str, Any] = {}
    seen: set[int] = set()
    for path, obj in pairs(module):
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        target = variables if isinstance(obj, Variable) else nnx_objects
        target[_nest.path_to_str(path)] = obj
    return variables, nnx_objects


def nnx_places(module: Any, roots: list[Any]) -> list[tuple[_nest.Path, Any]]:
    """Every `(path, root)` at which `module` holds one of the NNX objects `roots`."""
    wanted = {id(root) for root in roots}
    return [(path, obj) for path, obj in pairs(module) if id(obj) in wanted]


def loop_state(module: Any) -> tuple[list[Variable], list[Any]]:
    """The `looproto.Variable`s and the NNX objects of `module`, each once, in walk order.

    Run on every loop call, so a replaced sub-module is never missed; for a `Module`
    it is one `Module._flatten` walk (not walking into NNX objects).
    """
    if isinstance(module, Module):
        found = list(module._flatten(predicate=is_loop_state, expand=False))
    else:
        seen: set[int] = set()
        found = []
        for _, obj in pairs(module):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
    variables = [obj for obj in found if isinstance(obj, Variable)]
    if len(variables) == len(found):
        return variables, []
    return variables, [obj for obj in found if not isinstance(obj, Variable)]
