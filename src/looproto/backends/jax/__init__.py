"""The JAX backend: one `jax.jit` call runs the whole inner loop.

Users write `train_step(iterator)` in the same stateful style as on every other
backend: read `self.w.value`, assign new values. For each inner loop the adapter

1. walks the module for its `looproto.Variable`s and lifts their arrays into a
   list (the carried state of a `lax.scan`);
2. pulls `num_steps` batches from the iterator on the host and stacks them
   (`data="stack"`), or -- for an `ArrayDataset` -- only the batch *indices*,
   gathering from a copy of the dataset kept on device (`data="device"`);
3. runs all steps in one jitted `lax.scan`. Inside the traced body the Variables
   are bound to the scan's tracers, `step_fn` runs against an iterator whose
   `next()` yields the current step's slice, and the new values are read back.
   The bindings are always restored (`finally`), so no Variable keeps a tracer;
4. donates the old state buffers and writes the results back into the Variables
   before returning, so actions, summaries and checkpoints see current values.

`value_and_grad(fn, module)` differentiates `fn()` with respect to the module's
trainable variables, the role `nnx.value_and_grad` plays for Flax NNX.

Flax NNX modules held in a `Module` are walked (`JaxBackend.expand`): their
`nnx.Variable`s are discovered and checkpointed, but not lifted into compiled loops.

See `docs/backends/jax.md` for what runs where and the traps.

The package holds one concept a file: `backend.py` (`JaxBackend`), `loop.py` (the
compiled loop), `batches.py` (pulling and stacking batches), `binding.py` (binding
Variables to tracers; `TracerLeakError`), `variables.py` (which Variables are lifted),
`nnx.py` (Flax NNX interop), `gradients.py` (`value_and_grad`, `grad`, `array_namespace`),
`options.py` (`BACKEND_OPTIONS`) and `distributed.py` (`jax.distributed`).
"""

from __future__ import annotations

from looproto.backends.jax.backend import JaxBackend
from looproto.backends.jax.binding import TracerLeakError
from looproto.backends.jax.distributed import JaxEngine, initialize_distributed
from looproto.backends.jax.gradients import array_namespace, grad, value_and_grad
from looproto.backends.jax.loop import _JaxLoop as _JaxLoop
from looproto.backends.jax.options import BACKEND_OPTIONS
from looproto.module import register_name_scope_hook

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

BACKEND = JaxBackend()
register_name_scope_hook(BACKEND.name_scope)
