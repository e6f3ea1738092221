"""Gradients over a Module: `value_and_grad`, `grad`, and `array_namespace`.

`value_and_grad(fn, module)` differentiates a stateful, argument-free `fn` with
respect to the module's trainable floating-point Variables by binding them to
`jax.value_and_grad`'s tracers (see `_binding.py`), and with respect to the `nnx.Param`s
of the Flax NNX objects it holds by putting copies holding those tracers where the
module holds the objects (see `_nnx_lift.py`), as the compiled loop does.
`array_namespace` is the other function-level helper user steps call, so it sits with
them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from looproto.backends._common import split_aux
from looproto.backends.jax._binding import bound_to
from looproto.backends.jax._nnx import is_nnx_node
from looproto.backends.jax._nnx_lift import copies_of, places, swapped
from looproto.backends.jax._variables import module_state
from looproto.errors import ConfigError
from looproto.module import Variable

# ----------------------------------------------------------------------------
# Gradients over a Module.


def _is_differentiable(variable: Variable) -> bool:
    return bool(variable.trainable) and all(
        jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in jax.tree.leaves(variable._value)
    )


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable variables.

    `fn` takes no arguments: it reads the module's Variables, as a stateful step
    does. Works eagerly and inside the compiled loop. Values that `fn` assigns to
    Variables (batch-norm statistics, say) are kept, as primal values.

    Flax NNX objects count too: their `nnx.Param`s are differentiated, and what `fn`
    changes in their other state (`BatchStat`s, `Rngs` counts) is kept.

    Args:
        fn: Returns a scalar loss, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or container of them) whose trainable floating-point
            `looproto.Variable`s and NNX `Param`s are differentiated; or a Flax NNX
            object the trainer holds, inside the compiled loop.
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`. `grads` maps the
        path (as in `variables_by_path`) of each trainable floating-point variable to
        its gradient (a tree of them for a `TreeVariable`), and the path of each NNX
        object to an `nnx.State` of its `Param`s' gradients -- what
        `nnx.Optimizer.update(model, grads)` takes. For an NNX `module`, `grads` is
        that `nnx.State` itself, as from `nnx.value_and_grad`. Integer and
        non-trainable variables have no entry.
    """
    if is_nnx_node(module):
        variables: dict[str, Variable] = {}
        roots: dict[str, Any] = {"": module}
    else:
        variables, roots = module_state(module)
    paths = [p for p, v in variables.items() if _is_differentiable(v)]
    params = {p: variables[p]._value for p in paths}
    diff_vars = [variables[p] for p in paths]
    every = list(variables.values())
    nnx_roots = tuple(roots.values())
    if nnx_roots:
        where = places(module, nnx_roots)
        if not where:
            raise ConfigError(
                "`value_and_grad(fn, module)` with a Flax NNX object as `module` works while "
                "the JAX backend's compiled loop traces the step that holds it. Elsewhere "
                "pass the `looproto.Module` holding it (`value_and_grad(fn, self)`), or use "
                "`nnx.value_and_grad`."
            )
        nnx = sys.modules["flax.nnx"]
        graphdef, nnx_params, rest = nnx.split(nnx_roots, nnx.Param, ...)
    else:
        where, graphdef, nnx_params, rest = [], None, {}, None

    def pure(p: dict[str, Any], q: Any) -> tuple[Any, tuple[Any, list[Any], Any]]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(bound_to(diff_vars, [p[path] for path in paths]))
            copies: tuple[Any, ...] = ()
            if nnx_roots:
                copies = copies_of(nnx_roots, graphdef, q, rest)
                copy_of = {id(r): c for r, c in zip(nnx_roots, copies)}
                stack.enter_context(swapped(module, where, copy_of, "value_and_grad"))
            before = [v._value for v in every]
            out = fn()
            # Keep what `fn` assigned; None marks "unchanged".
            updates = [
                new if new is not old else None
                for new, old in zip((v._value for v in every), before)
            ]
        new_state = sys.modules["flax.nnx"].state(copies) if nnx_roots else None
        loss, aux = split_aux(out, has_aux)
        return loss, (aux, updates, new_state)

    (loss, (aux, updates, new_state)), (grads, nnx_grads) = jax.value_and_grad(
        pure, argnums=(0, 1), has_aux=True
    )(params, nnx_params)
    for variable, new in zip(every, updates):
        if new is not None:
            variable._value = new
    if nnx_roots:
        nnx = sys.modules["flax.nnx"]
        nnx.update(nnx_roots, new_state)
        if is_nnx_node(module):
            return ((loss, aux) if has_aux else loss), nnx_grads.get(0, nnx.State({}))
        for i, path in enumerate(roots):
            if i in nnx_grads:  # (an `nnx.Optimizer` has no `Param`s)
                grads[path] = nnx_grads[i]
    return ((loss, aux) if has_aux else loss), grads


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads


def array_namespace() -> Any:
    """The Python array API for JAX arrays: `jax.numpy`, which implements the standard."""
    return jnp
