"""Binding `looproto.Variable`s to traced values, and the guard against tracer leaks.

Inside a compiled loop or `value_and_grad`, each Variable is bound to a JAX tracer for
the length of one trace and always restored afterwards (`bound_to`). Everywhere else the
backend's `on_assign` hook (`tracer_guard`, installed when the backend loads) refuses
to store a tracer, raising `TracerLeakError`. The binding depth (`_tls`) is the one
piece of state both sides share, which is why they live together here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import jax

from looproto.errors import ProtocolError
from looproto.module import TreeVariable, Variable

Tracer = jax.core.Tracer


class TracerLeakError(ProtocolError):
    """A JAX tracer would be stored in a `Variable` outside a looproto-managed trace."""


# ----------------------------------------------------------------------------
# Binding Variables to traced values.

_tls = threading.local()


def _bind_depth() -> int:
    return getattr(_tls, "depth", 0)


def _holds_tracer(variable: Variable, value: Any) -> bool:
    if isinstance(value, Tracer):
        return True
    return isinstance(variable, TreeVariable) and any(
        isinstance(leaf, Tracer) for leaf in jax.tree.leaves(value)
    )


def tracer_guard(variable: Variable, value: Any) -> None:
    """The backend's `on_assign`: no tracer may be stored outside a bound scope."""
    if not getattr(_tls, "depth", 0) and _holds_tracer(variable, value):
        raise TracerLeakError(
            f"Variable {variable.name!r} was assigned a JAX tracer outside a looproto JAX "
            "loop (for example under a bare `jax.jit`, `jax.grad` or `jax.vmap` of a "
            "stateful method). The tracer would leak out of its trace. Run the step through "
            "`StandardTrainer.train` (the JAX backend's compiled loop), differentiate with "
            "`looproto.backends.jax.value_and_grad`, or pass arrays explicitly."
        )


@contextlib.contextmanager
def bound_to(variables: Sequence[Variable], values: Sequence[Any]) -> Any:
    """Binds `variables` to `values`; restores the old values on exit, always."""
    old = [v._value for v in variables]
    _tls.depth = _bind_depth() + 1
    try:
        for variable, value in zip(variables, values):
            variable._value = value
        yield
    finally:
        for variable, value in zip(variables, old):
            variable._value = value
        _tls.depth -= 1
