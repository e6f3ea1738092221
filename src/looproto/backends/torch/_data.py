"""Data state in checkpoints: torchdata's loaders, and torch tensors inside JSON.

A `StatefulDataLoader` (and its single-process iterators) saves its position with
`state_dict()` / `load_state_dict()`; looproto adapts that to the iterator-state
protocol. Only torchdata's classes: `torch.nn.Module` and optimizers have
`state_dict` too, and their state is variables, not a data position. A sampler's
state may hold tensors (a generator's state); they are written to the JSON item as
dtype, shape and base64 bytes under the tag `TENSOR_TAG`.
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Final

import numpy as np
import torch

from looproto.errors import CheckpointError

__all__ = ["TENSOR_TAG", "StateDictAdapter", "iterator_state", "tensor_from_json", "tensor_to_json"]

_log = logging.getLogger("looproto")

TENSOR_TAG: Final = "__looproto_tensor__"

_warned_unrestorable: set[type] = set()


class StateDictAdapter:
    """The iterator-state protocol on `state_dict()`/`load_state_dict()` (torchdata)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def get_state(self) -> Any:
        """The loader's `state_dict()`."""
        return self._obj.state_dict()

    def set_state(self, state: Any) -> None:
        """`load_state_dict(state)`."""
        self._obj.load_state_dict(state)


def iterator_state(obj: Any) -> StateDictAdapter | None:
    """The position of a torchdata loader or iterator, else None."""
    if not type(obj).__module__.startswith("torchdata."):
        return None
    if not callable(getattr(obj, "state_dict", None)):
        return None
    if callable(getattr(obj, "load_state_dict", None)):
        return StateDictAdapter(obj)
    if type(obj) not in _warned_unrestorable:
        _warned_unrestorable.add(type(obj))
        # A multi-worker iterator can only be restored through its loader, when the
        # loader is next iterated; an iterator created before the restore starts over.
        _log.warning(
            "The position of a %s cannot be restored in place; a resumed run starts it "
            "over. Checkpoint the `StatefulDataLoader` and call `iter()` on it after "
            "restoring, or use `num_workers=0`.",
            type(obj).__name__,
        )
    return None


def tensor_to_json(value: Any) -> tuple[str, Any] | None:
    """`(TENSOR_TAG, payload)` for a tensor, else None."""
    if not isinstance(value, torch.Tensor):
        return None
    array = np.ascontiguousarray(value.detach().cpu().numpy())
    return TENSOR_TAG, {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def tensor_from_json(tag: str, payload: Any) -> torch.Tensor:
    """The CPU tensor `tensor_to_json` wrote."""
    if tag != TENSOR_TAG:
        raise CheckpointError(f"The torch backend reads JSON tag {TENSOR_TAG!r}; received {tag!r}.")
    array = np.frombuffer(base64.b64decode(payload["data"]), dtype=np.dtype(payload["dtype"]))
    return torch.from_numpy(array.reshape(payload["shape"]).copy())
