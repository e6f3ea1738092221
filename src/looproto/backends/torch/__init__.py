"""The PyTorch backend: a `torch.compile`d step, state kept on device, one host sync per loop.

Users write `train_step(iterator)` as ordinary eager PyTorch: forward, `backward()`,
`optimizer.step()`. For each inner loop of `num_steps` steps the adapter

1. walks the module once: the device of its tensors (all must agree, or the
   `device` option says where), and its NumPy `looproto.Variable`s (the global
   step from `looproto.create_global_step()`, loss accumulators, ...);
2. *lifts* those NumPy Variables onto the device as tensors for the duration of
   the loop. `assign_add` inside a compiled step is then a tensor op: one graph, no
   recompiles, `fullgraph=True` works. (Left as NumPy, Dynamo traces the NumPy
   code, graph-breaks on it, changes the value's type to a 0-d `ndarray` and runs
   ~10x slower; a Python `int` counter recompiles every step until the recompile
   limit. Measured on torch 2.13; see `docs/backends/torch.md`.);
3. pulls one batch per step from the iterator on the host, moves it to the
   device (`non_blocking`), and hands it to the step through a tiny iterator,
   so Dynamo never traces the data pipeline;
4. calls the step compiled once with `torch.compile` (cached; `mode`,
   `fullgraph`, `dynamic` and `backend` are options), or eagerly. Outputs stay on
   device; with `nan_check` a few fused device ops per step record the first
   step whose outputs were not finite. Nothing is read back per step;
5. at the end, fetches the lifted Variables and the NaN record in *one*
   device-to-host transfer and writes the Variables back as NumPy, so
   `train_loop_end`, summaries, the Controller and checkpoints see host values.

Discovery: a `torch.nn.Module` held by a `looproto.Module` contributes its
parameters (`torch.nn.Parameter`, trainable when `requires_grad`) and persistent
buffers under their `named_parameters()` paths split on "."; a
`DistributedDataParallel`/`DataParallel` or `torch.compile` wrapper is
unwrapped so paths do not change. A `torch.optim.Optimizer` contributes the
numeric entries of its param groups (`lr`, `betas`, ...) and its per-parameter
state keyed by the parameter's name (when built from `named_parameters()`) or
its position, plus a `has_state` flag per parameter. A learning-rate scheduler
contributes the numeric entries of its `state_dict()`, a `torch.Generator` its
state. Plain tensor attributes are not state (as on an `nn.Module`). Optimizer state is
created lazily by the first `step()`; so that a fresh optimizer can be restored
into, its not-yet-existing state is shown as *pending* entries (shapes found by
one step of a throwaway copy) that a checkpoint restore creates, and that stay
absent when the checkpoint says `has_state=False`.

`value_and_grad(fn, module)` returns `fn()`'s gradients keyed by variable path,
like `looproto.backends.jax.value_and_grad`.
"""

# The package's files, one concept each (the backend object last, as it uses the rest):
# tensors (tensor <-> NumPy conversions and in-place writes), views (Variables for state
# torch keeps in its own containers), discovery (walking modules, optimizers, schedulers),
# gradients, device (data movement and the one transfer back), errors, options, loop
# (the compiled inner loop), distributed (torch.distributed), backend (`TorchBackend`).

from __future__ import annotations

import torch

from looproto.backends.torch.backend import TorchBackend
from looproto.backends.torch.distributed import (
    TorchEngine,
    data_parallel,
    initialize_distributed,
    process_group_size,
)
from looproto.backends.torch.errors import NonFiniteError
from looproto.backends.torch.gradients import array_namespace, grad, value_and_grad
from looproto.backends.torch.options import BACKEND_OPTIONS
from looproto.module import register_hook_gate, register_name_scope_hook

__all__ = [
    "BACKEND",
    "BACKEND_OPTIONS",
    "NonFiniteError",
    "TorchBackend",
    "TorchEngine",
    "array_namespace",
    "data_parallel",
    "grad",
    "initialize_distributed",
    "process_group_size",
    "value_and_grad",
]

BACKEND = TorchBackend()
register_name_scope_hook(BACKEND.name_scope)
register_hook_gate(torch.compiler.is_compiling)
