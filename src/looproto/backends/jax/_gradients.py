"""Gradients over a Module: `value_and_grad`, `grad`, and `array_namespace`.

`value_and_grad(fn, module)` differentiates a stateful, argument-free `fn` with
respect to the module's trainable floating-point Variables by binding them to
`jax.value_and_grad`'s tracers (see `binding.py`). `array_namespace` is the other
function-level helper user steps call, so it sits with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from looproto.backends._common import split_aux
from looproto.backends.jax._binding import bound_to
from looproto.backends.jax._variables import module_variables
from looproto.module import Variable

# ----------------------------------------------------------------------------
# Gradients over a Module.


def _is_differentiable(variable: Variable) -> bool:
    return bool(variable.trainable) and jnp.issubdtype(variable._value.dtype, jnp.inexact)


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable variables.

    `fn` takes no arguments: it reads the module's Variables, as a stateful step
    does. Works eagerly and inside the compiled loop. Values that `fn` assigns to
    Variables (batch-norm statistics, say) are kept, as primal values.

    Args:
        fn: Returns a scalar loss, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or container of them) whose trainable floating-point
            `looproto.Variable`s are differentiated.
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`; `grads` maps the
        path (as in `variables_by_path`) of each trainable floating-point variable to
        its gradient. Integer and non-trainable variables have no entry.
    """
    paths, variables = module_variables(module)
    diff = [i for i, v in enumerate(variables) if _is_differentiable(v)]
    params = {paths[i]: variables[i]._value for i in diff}
    diff_vars = [variables[i] for i in diff]

    def pure(p: dict[str, Any]) -> tuple[Any, tuple[Any, list[Any]]]:
        bound = [p[paths[i]] for i in diff]
        with bound_to(diff_vars, bound):
            before = [v._value for v in variables]
            out = fn()
            # Keep what `fn` assigned; None marks "unchanged".
            updates = [
                new if new is not old else None
                for new, old in zip((v._value for v in variables), before)
            ]
        loss, aux = split_aux(out, has_aux)
        return loss, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(pure, has_aux=True)(params)
    for variable, new in zip(variables, updates):
        if new is not None:
            variable._value = new
    return ((loss, aux) if has_aux else loss), grads


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads


def array_namespace() -> Any:
    """The Python array API for JAX arrays: `jax.numpy`, which implements the standard."""
    return jnp
