"""No stale reads: a traced step may read only what its compiled loop carries.

A compiled loop carries the state its module holds. A step that reaches other state
-- through a closure (`self.predict = lambda x: x @ trainer.w.value`), a global, or
another trainer -- would read it once, at trace time, and the compiled program would
keep that value as a constant forever (an evaluator reporting the same loss after
hundreds of training steps). Two checks catch it while the step is traced:

* **`looproto.Variable` reads** (`refusing_stale_reads`): while a loop traces, a read
  hook (`looproto.backends.read_hooks`, called by `Variable.value`) raises
  `StaleReadError` for a Variable holding a concrete array: the loop's own Variables
  are bound to tracers then, so a concrete one is exactly a Variable the loop does
  not carry. The hook is installed only while some thread traces; outside traces
  `Variable.value` costs one empty-list test.
* **Any variable's array baked as a constant** (`check_constants`): after the step
  runs, the constants the trace captured are looked at. One that is the current value
  of this loop's Flax NNX variables means the step reached an original NNX object
  (a bound method or closure kept from before) instead of the traced copy the loop
  swapped in; one that another NNX `Variable` or `looproto.Variable` holds (found
  with `gc.get_referrers`, once per compilation and only if the trace captured
  device arrays at all) is another module's. The trace's constants are read from
  JAX's tracing state, which is not public API: if a JAX release moves it, this
  second check is skipped, never wrong.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import jax

from looproto.backends._common import TracingReadCheck
from looproto.backends.jax._binding import Tracer
from looproto.backends.jax._nnx import is_nnx_variable
from looproto.errors import StaleReadError
from looproto.module import TreeVariable, Variable

_HOW = (
    "Its value at this trace would be baked into the compiled program as a constant and "
    "never updated. Make it reachable from the trainer or evaluator that runs the step: "
    "hold the module that owns it as an attribute (`self.model = trainer.model`) and read "
    "it there. To bake a value on purpose, close over a copy made outside the step "
    "(`jnp.array(variable.value)`)."
)


def _is_bound(value: Any, tree: bool) -> bool:
    if isinstance(value, Tracer):
        return True
    if not tree:
        return False
    leaves = jax.tree.leaves(value)
    return not leaves or any(isinstance(leaf, Tracer) for leaf in leaves)


def _check_read(variable: Variable, step: str) -> None:
    if _is_bound(variable._value, isinstance(variable, TreeVariable)):
        return
    raise StaleReadError(
        f"`{step}` read looproto Variable {variable.name!r} while the JAX backend traced "
        "its compiled loop, but the loop does not carry it: the Variable is not reachable "
        "from the trainer or evaluator that runs the step (it was reached through a "
        f"closure, a global or another trainer). {_HOW}"
    )


_reads = TracingReadCheck(_check_read)


def refusing_stale_reads(step_name: str) -> contextlib.AbstractContextManager[None]:
    """While `step_name` is traced in this thread, reads of uncarried Variables raise."""
    return _reads.tracing(step_name)


def _trace_constants() -> list[Any]:
    """The device arrays the current trace captured as constants ([] if JAX hides them)."""
    try:
        from jax._src import core

        values = list(core.trace_ctx.trace.frame.constvar_to_val.values())
    except Exception:  # A JAX whose tracing state looks otherwise: skip the check.
        return []
    return [value for value in values if isinstance(value, jax.Array)]


def _owner_attribute(variable: Any) -> str:
    """`"Linear.kernel"` for an NNX variable held by a `Linear`, else its type's name."""
    for referrer in gc.get_referrers(variable):
        holders = [referrer] if hasattr(referrer, "__dict__") else gc.get_referrers(referrer)
        for holder in holders:
            attributes = getattr(holder, "__dict__", None)
            if isinstance(attributes, dict) and not isinstance(holder, type):
                for name, value in attributes.items():
                    if value is variable:
                        return f"{type(holder).__name__}.{name}"
    return type(variable).__name__


def check_constants(step_name: str, carried: dict[int, str]) -> None:
    """At the end of a traced step: no captured constant is a variable's current value.

    Args:
        step_name: For messages.
        carried: `{id(raw value): path}` of the loop's own NNX variables.

    Raises:
        StaleReadError: Naming the variable.
    """
    constants = _trace_constants()
    if not constants:
        return
    for value in constants:
        if id(value) in carried:
            raise StaleReadError(
                f"`{step_name}` read the Flax NNX variable {carried[id(value)]!r} of the "
                "original object, not of the traced copy the JAX backend's compiled loop "
                "put in its place: the step reached the object through a reference kept "
                "from before (a bound method such as `self.forward = self.model.__call__`, "
                "a `functools.partial`, a closure). Its value would be baked into the "
                "compiled program. Reach NNX objects through the module's attributes "
                "inside the step (`self.model(x)`)."
            )
    ids = {id(value) for value in constants}
    for referrer in gc.get_referrers(*constants):
        if is_nnx_variable(referrer) and id(referrer.get_raw_value()) in ids:
            shape = tuple(referrer.get_raw_value().shape)
            raise StaleReadError(
                f"`{step_name}` read a Flax NNX variable (`{_owner_attribute(referrer)}`, "
                f"shape {shape}) while the JAX backend traced its compiled loop, but the "
                "loop does not carry it: the object holding it is not reachable from the "
                "trainer or evaluator that runs the step (it was reached through a "
                f"closure, a global or another trainer). {_HOW}"
            )
        if isinstance(referrer, Variable) and id(referrer._value) in ids:
            raise StaleReadError(
                f"`{step_name}` read looproto Variable {referrer.name!r} while the JAX "
                "backend traced its compiled loop, but the loop does not carry it. " + _HOW
            )
