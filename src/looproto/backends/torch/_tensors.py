"""Tensors to NumPy and back: host copies, in-place writes that keep device and dtype.

The conversions every other part of the backend shares (views, discovery, the device
transfer, `TorchBackend.assign`), kept apart so that none of those has to import the
others just to copy a tensor to the host or write an array into one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from looproto.errors import ShapeError
from looproto.module import Variable


def np_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return np.dtype(str(dtype).rpartition(".")[2])


def tensor_of(obj: Any) -> Any:
    """The tensor behind a Parameter, a view or a `looproto.Variable` (else `obj`)."""
    return obj.value if isinstance(obj, Variable) else obj


def from_python(value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, torch.Tensor):
        return to_numpy_tensor(value)
    array = np.asarray(value)
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    return array.astype(np.float64)


def like_python(template: Any, array: np.ndarray[Any, Any]) -> Any:
    """`array` in the Python form of `template` (a number, a list or tuple of them)."""
    if isinstance(template, (list, tuple)):
        items = [like_python(t, a) for t, a in zip(template, np.asarray(array).reshape(-1))]
        return type(template)(items)
    return type(template)(np.asarray(array).item())


def to_numpy_tensor(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A host copy (a CPU tensor's `.numpy()` alone would share its memory)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16.
        tensor = tensor.float()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    array: np.ndarray[Any, Any] = np.array(tensor.numpy(), copy=True)
    return array


def write_tensor(tensor: torch.Tensor, array: np.ndarray[Any, Any], name: str) -> None:
    """Copies `array` into `tensor` in place (device and dtype kept; same-kind casts only)."""
    array = np.asarray(array)
    if tuple(tensor.shape) != tuple(array.shape):
        raise ShapeError(
            f"Cannot assign an array of shape {array.shape} to {name!r} of shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.dtype != torch.bfloat16:
        target = np_dtype(tensor.dtype)
        if array.dtype != target and not np.can_cast(array.dtype, target, casting="same_kind"):
            raise ShapeError(
                f"Cannot assign an array of dtype {array.dtype} to {name!r} of dtype {target}."
            )
    source = torch.from_numpy(np.array(array, copy=True))
    with torch.no_grad():
        tensor.copy_(source)


def fill_tensor(tensor: torch.Tensor, number: Any, name: str) -> None:
    """`tensor.fill_(number)`, refusing what NumPy would refuse (no NumPy: traceable)."""
    if isinstance(number, np.generic):
        number = number.item()
    if tensor.dim() != 0:
        raise ShapeError(
            f"Cannot assign the number {number!r} to {name!r} of shape {tuple(tensor.shape)}: "
            "the shape of a variable is fixed when it is created."
        )
    lossy = (isinstance(number, complex) and not tensor.is_complex()) or (
        isinstance(number, float) and not (tensor.is_floating_point() or tensor.is_complex())
    )
    if lossy or (tensor.dtype == torch.bool and not isinstance(number, bool)):
        raise ShapeError(
            f"Cannot assign {number!r} to {name!r} of dtype {tensor.dtype}: expected a value "
            "of that dtype."
        )
    with torch.no_grad():
        tensor.fill_(number)
