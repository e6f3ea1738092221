"""Devices: moving batches onto the device, one transfer back, and torch_xla.

What differs between CPU, CUDA and XLA devices (a per-step sync, how many tensors
come back in one device-to-host copy, CUDA-graph step marks) behind one small
`DeviceOps` interface, chosen by `device_ops`; the loop and `TorchBackend.to_host`
use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from looproto.backends.torch._tensors import np_dtype, to_numpy_tensor
from looproto.errors import BackendNotAvailableError


def xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


class DeviceOps:
    """What differs between devices: per-step sync, and fetching many tensors at once."""

    cudagraph_steps = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def after_step(self) -> None:
        """Nothing: CUDA and CPU queue work asynchronously."""

    def fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray[Any, Any]]:
        """Host copies of `tensors` in one device-to-host transfer.

        The tensors are viewed as bytes and concatenated on device (widest dtype
        first, so every slice stays aligned), copied once, and split on the host.
        """
        if not tensors:
            return []
        if len(tensors) == 1:
            return [to_numpy_tensor(tensors[0])]
        prepared = [
            t.detach().float() if t.dtype == torch.bfloat16 else t.detach() for t in tensors
        ]
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i].element_size())
        parts = [prepared[i].reshape(-1).view(torch.uint8) for i in order]
        on_device = torch.cat(parts)
        packed = (on_device if on_device.device.type == "cpu" else on_device.cpu()).numpy()
        out: list[np.ndarray[Any, Any]] = [np.empty(0)] * len(prepared)
        offset = 0
        for i, part in zip(order, parts):
            size = part.numel()
            t = prepared[i]
            chunk = packed[offset : offset + size]
            out[i] = chunk.view(np_dtype(t.dtype)).reshape(t.shape).copy()
            offset += size
        return out


class _XlaOps(DeviceOps):
    """torch_xla: cut the lazy graph after every step; one execution fetches everything."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
        except ImportError as err:
            raise BackendNotAvailableError(
                f"`device` {str(device)!r} is an XLA device, which needs torch_xla "
                f"({err}). Install a torch_xla matching torch {torch.__version__}."
            ) from err
        self._sync: Callable[[], Any] = getattr(torch_xla, "sync", None) or xm.mark_step
        self._get_cpu = getattr(torch_xla._XLAC, "_xla_get_cpu_tensors", None)

    def after_step(self) -> None:
        self._sync()

    def fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray[Any, Any]]:
        if not tensors:
            return []
        self._sync()
        if self._get_cpu is None:  # pragma: no cover - older/newer torch_xla
            return [to_numpy_tensor(t) for t in tensors]
        return [np.array(t.numpy(), copy=True) for t in self._get_cpu(list(tensors))]


class _CudaOps(DeviceOps):
    pass


def device_ops(device: torch.device, mode: str | None) -> DeviceOps:
    if device.type == "xla":
        return _XlaOps(device)
    if device.type == "cuda":
        ops = _CudaOps(device)
        ops.cudagraph_steps = mode == "reduce-overhead"
        return ops
    return DeviceOps(device)


def same_device(a: torch.device, b: torch.device) -> bool:
    """`"cuda"` and `"cuda:0"` are the same device when 0 is the current one."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every array and tensor on `device` (NumPy arrays become tensors)."""
    kind = type(batch)
    if kind is torch.Tensor:  # The common cases first: this runs every step.
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if kind is tuple or kind is list:
        return kind([to_device(v, device) for v in batch])
    if kind is dict:
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind in "OUSV":
            return batch
        if not batch.flags.writeable:
            batch = batch.copy()  # torch warns on read-only memory.
        tensor = torch.from_numpy(batch)
        return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
