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
its position, plus a `has_state` flag per parameter, and its flags and strings as one
JSON state. A learning-rate scheduler (nested ones too), a `GradScaler` and any other
torch object with `state_dict()`/`load_state_dict()` contribute everything in their
`state_dict()` (numbers and tensors as variables, flags and strings as JSON; what a
checkpoint cannot hold as a `looproto.backends.Unsaveable` leaf, so that a save fails
naming it), a `torch.Generator` its state. Plain tensor attributes are not state (as on
an `nn.Module`). Optimizer state is created lazily by the first `step()`; so that a
fresh optimizer can be restored into, its not-yet-existing state is shown as *pending*
entries (shapes found by one step of a throwaway copy) that a checkpoint restore
creates, and that stay absent when the checkpoint says `has_state=False`.

`value_and_grad(fn, module)` returns `fn()`'s gradients keyed by variable path,
like `looproto.backends.jax.value_and_grad`.
"""

# The package's files, one concept each: _tensors (tensor <-> NumPy conversions and
# in-place writes), _views (Variables for state torch keeps in its own containers),
# _discovery (walking modules and optimizers), _state_dicts (objects saved through their
# state_dict(): schedulers, GradScaler), _keras (Keras on torch, refused), _gradients,
# _device (data movement and the one transfer back), _errors, _options, _loop (the compiled inner
# loop), _distributed (torch.distributed), _data (torchdata loaders and tensors in
# checkpoints' JSON), _launch (torchrun's environment, framework-free), _backend
# (`TorchBackend`). This file imports no torch: it registers the backend, and each
# public name below imports its file (and torch) when it is first read.

from __future__ import annotations

from typing import TYPE_CHECKING

from looproto import backends
from looproto.backends._common import lazy_exports
from looproto.backends.torch._launch import LAUNCHER

if TYPE_CHECKING:
    from looproto.backends.torch._backend import BACKEND as BACKEND
    from looproto.backends.torch._backend import TorchBackend as TorchBackend
    from looproto.backends.torch._distributed import TorchEngine as TorchEngine
    from looproto.backends.torch._distributed import data_parallel as data_parallel
    from looproto.backends.torch._distributed import (
        initialize_distributed as initialize_distributed,
    )
    from looproto.backends.torch._distributed import process_group_size as process_group_size
    from looproto.backends.torch._errors import NonFiniteError as NonFiniteError
    from looproto.backends.torch._gradients import array_namespace as array_namespace
    from looproto.backends.torch._gradients import grad as grad
    from looproto.backends.torch._gradients import value_and_grad as value_and_grad
    from looproto.backends.torch._options import BACKEND_OPTIONS as BACKEND_OPTIONS

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

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BACKEND": "_backend",
        "BACKEND_OPTIONS": "_options",
        "NonFiniteError": "_errors",
        "TorchBackend": "_backend",
        "TorchEngine": "_distributed",
        "array_namespace": "_gradients",
        "data_parallel": "_distributed",
        "grad": "_gradients",
        "initialize_distributed": "_distributed",
        "process_group_size": "_distributed",
        "value_and_grad": "_gradients",
    },
)

backends.register(
    "torch",
    "looproto.backends.torch._backend:BACKEND",
    packages=("torch", "torch_xla", "torchdata", "keras"),
    aliases=("pytorch",),
    install="looproto[torch]",
    launcher=LAUNCHER,
    json_tags=("__looproto_tensor__",),
)
