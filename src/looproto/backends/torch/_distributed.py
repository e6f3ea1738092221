"""Multi-process: `torch.distributed` as a `looproto.distributed.Engine`, and DDP.

`initialize_distributed` joins or makes the process group (NCCL or gloo) and returns a
`TorchEngine`; `data_parallel` wraps a model in DDP when several processes train;
`is_peer_failure` tells a dead or silent peer from a bug in the step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch

from looproto import distributed
from looproto.backends.torch._errors import first_line
from looproto.backends.torch._launch import LAUNCHER
from looproto.errors import (
    BackendNotAvailableError,
    ConfigError,
    DistributedError,
    LooprotoError,
)

# What gloo and NCCL say when a peer process is gone or silent. Gloo raises plain
# `RuntimeError`s, so the text is all there is to tell them from a bug in the step.
_PEER_FAILURE_MARKERS = (
    "gloo",
    "NCCL",
    "Connection reset by peer",
    "Connection closed by peer",
    "Timed out waiting",
    "Broken pipe",
)


def process_group_size() -> int:
    """How many processes the default `torch.distributed` group has (1 without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def is_peer_failure(err: BaseException) -> bool:
    if isinstance(err, LooprotoError) or not isinstance(err, RuntimeError):
        return False
    if process_group_size() < 2:
        return False
    if isinstance(err, torch.distributed.DistError):
        return True
    return any(marker in str(err) for marker in _PEER_FAILURE_MARKERS)


class TorchEngine:
    """`looproto.distributed.Engine` on `torch.distributed` (see `initialize_distributed`).

    Control messages go through the process group's `TCPStore` (the one `torchrun`
    or `init_process_group` made), with the run's timeout; orbax does not see the
    processes, so the chief writes checkpoints (`collective_checkpoints` is False).
    """

    backend = "torch"
    collective_checkpoints = False

    def __init__(self, timeout: float, owns_group: bool) -> None:
        dist = torch.distributed
        self.process_index = int(dist.get_rank())
        self.process_count = int(dist.get_world_size())
        self.timeout = timeout
        self._owns_group = owns_group
        # `torchrun` restarts keep its store: keys of an earlier attempt must not count.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.distributed_c10d._get_default_store()
        self._store = dist.PrefixStore(f"looproto/{attempt}/", store)  # type: ignore[attr-defined]

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._store.set(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        self._store.set_timeout(datetime.timedelta(seconds=timeout))
        return bytes(self._store.get(key)).decode()

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._store.delete_key(key)

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """See `looproto.distributed.Engine`: nothing to enter."""
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: destroys the process group looproto made."""
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __repr__(self) -> str:
        return f"TorchEngine(process {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> TorchEngine:
    """Joins (or adopts) the `torch.distributed` process group, for `distributed.initialize`.

    Without a process group, one is made from `torchrun`'s environment (`RANK`,
    `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `looproto train --num-processes` sets
    the same): NCCL when each local process has a GPU of its own (process
    `LOCAL_RANK` on `cuda:LOCAL_RANK`), gloo otherwise, with `timeout` for joining and
    for every collective.

    Raises:
        ConfigError: No process group and no `torchrun` environment.
        DistributedError: The other processes did not join within `timeout`.
    """
    dist = torch.distributed
    if not dist.is_available():
        raise BackendNotAvailableError(
            f"This torch ({torch.__version__}) is built without `torch.distributed`."
        )
    if dist.is_initialized():
        return TorchEngine(timeout, owns_group=False)
    env = LAUNCHER.environment(os.environ)
    if env is None or env.coordinator is None:
        raise ConfigError(
            "No torch process group, and `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and "
            "`MASTER_PORT` are not all set. Launch with `torchrun --nproc-per-node=N ...` or "
            "`looproto train CONFIG --num-processes N`, or call "
            "`torch.distributed.init_process_group` first."
        )
    group_backend = "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", env.process_index))
    local_count = int(os.environ.get("LOCAL_WORLD_SIZE", env.process_count))
    # NCCL needs a GPU of its own per process; with fewer GPUs than local processes
    # every process stays on gloo (and the CPU, unless the model is moved).
    if torch.cuda.is_available() and local_count <= torch.cuda.device_count():
        group_backend = "nccl"
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(group_backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"Process {env.process_index} of {env.process_count} could not join the torch "
            f"process group at {env.coordinator} within {timeout:g} s: {first_line(err)}"
        ) from err
    return TorchEngine(timeout, owns_group=True)


def data_parallel(module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """`module` in `DistributedDataParallel` when several processes train, else `module`.

    On NCCL the module first moves to this process's GPU (`device_ids` set to it).
    Checkpoint paths do not change: discovery looks through the wrapper.

    Args:
        module: The model.
        **kwargs: More `DistributedDataParallel` arguments.
    """
    if process_group_size() < 2:
        return module
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        module.to(device)
        kwargs.setdefault("device_ids", [device.index])
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)
