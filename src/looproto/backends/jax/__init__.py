"""The JAX backend: one `jax.jit` call runs the whole inner loop.

Users write `train_step(iterator)` in the same stateful style as on every other
backend: read `self.w.value`, assign new values. For each inner loop the adapter

1. walks the module for its `looproto.Variable`s (arrays or pytrees) and the Flax NNX
   objects it holds, and lifts their arrays into a list (the carried state of a
   `lax.scan`);
2. pulls `num_steps` batches from the iterator on the host and stacks them
   (`data="stack"`), or -- for an `ArrayDataset` -- only the batch *indices*,
   gathering from a copy of the dataset kept on device (`data="device"`);
3. runs all steps in one jitted `lax.scan`. Inside the traced body the Variables
   are bound to the scan's tracers (NNX objects are replaced, where the module holds
   them, by copies holding the tracers), `step_fn` runs against an iterator whose
   `next()` yields the current step's slice, and the new values are read back.
   The bindings are always restored (`finally`), so no Variable keeps a tracer. A
   read of state the loop does not carry raises `StaleReadError` (`_stale.py`);
4. donates the old state buffers and writes the results back into the Variables
   before returning, so actions, summaries and checkpoints see current values.

`value_and_grad(fn, module)` differentiates `fn()` with respect to the module's
trainable variables, the role `nnx.value_and_grad` plays for Flax NNX.

Flax NNX modules held in a `Module` are walked (`JaxBackend.expand`): their
`nnx.Variable`s are discovered and checkpointed, and trained inside compiled loops
(`_nnx_lift.py`).

See `docs/backends/jax.md` for what runs where and the traps.

The package holds one concept a file: `_backend.py` (`JaxBackend`), `_loop.py` (the
compiled loop), `_carry.py` (its carried values in and out), `_batches.py` (pulling and
stacking batches), `_binding.py` (binding
Variables to tracers; `TracerLeakError`), `_variables.py` (what is lifted), `_nnx.py`
(Flax NNX interop), `_nnx_lift.py` (NNX objects in traced code), `_stale.py` (no stale
reads), `_gradients.py` (`value_and_grad`, `grad`,
`array_namespace`), `_options.py` (`BACKEND_OPTIONS`), `_distributed.py`
(`jax.distributed`) and `_launch.py` (the workers' environment, framework-free). This
file imports no JAX: it registers the backend, and each public name imports its file
(and JAX) when it is first read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from looproto import backends
from looproto.backends._common import lazy_exports
from looproto.backends.jax._launch import LAUNCHER

if TYPE_CHECKING:
    from looproto.backends.jax._backend import BACKEND as BACKEND
    from looproto.backends.jax._backend import JaxBackend as JaxBackend
    from looproto.backends.jax._binding import TracerLeakError as TracerLeakError
    from looproto.backends.jax._distributed import JaxEngine as JaxEngine
    from looproto.backends.jax._distributed import (
        initialize_distributed as initialize_distributed,
    )
    from looproto.backends.jax._gradients import array_namespace as array_namespace
    from looproto.backends.jax._gradients import grad as grad
    from looproto.backends.jax._gradients import value_and_grad as value_and_grad
    from looproto.backends.jax._options import BACKEND_OPTIONS as BACKEND_OPTIONS

__all__ = [
    "BACKEND",
    "BACKEND_OPTIONS",
    "JaxBackend",
    "JaxEngine",
    "TracerLeakError",
    "array_namespace",
    "grad",
    "initialize_distributed",
    "value_and_grad",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BACKEND": "_backend",
        "BACKEND_OPTIONS": "_options",
        "JaxBackend": "_backend",
        "JaxEngine": "_distributed",
        "TracerLeakError": "_binding",
        "array_namespace": "_gradients",
        "grad": "_gradients",
        "initialize_distributed": "_distributed",
        "value_and_grad": "_gradients",
    },
)

backends.register(
    "jax",
    "looproto.backends.jax._backend:BACKEND",
    packages=("jax", "jaxlib", "flax", "optax", "keras"),
    install="looproto[jax]",
    launcher=LAUNCHER,
)
