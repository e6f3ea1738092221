"""Views: looproto Variables standing for state that torch keeps in its own containers.

A persistent buffer of an `nn.Module`, an optimizer's per-parameter state (pending
until a restore or the first `step()` creates it), a param-group or scheduler entry, a
`torch.Generator`'s state: each is a `looproto.Variable` whose value is read from and
written to the torch object on every access. Discovery (`discovery.py`) makes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from looproto.backends.torch._tensors import (
    from_python,
    like_python,
    np_dtype,
    to_numpy_tensor,
    write_tensor,
)
from looproto.module import Variable


class View(Variable):
    """A `looproto.Variable` whose value lives elsewhere (a buffer, optimizer state)."""

    __slots__ = ()

    def __init__(self, name: str) -> None:  # Variable.__init__ would store a value.
        self._name = f"{name}:0"
        self._trainable = False

    def _get(self) -> Any:
        raise NotImplementedError

    def _write(self, value: Any) -> None:
        raise NotImplementedError

    @property
    def _value(self) -> Any:
        return self._get()

    @_value.setter
    def _value(self, value: Any) -> None:
        self._write(value)

    @property
    def dtype(self) -> np.dtype[Any]:
        """See `looproto.Variable.dtype`."""
        value = self._get()
        return np_dtype(value.dtype) if isinstance(value, torch.Tensor) else np.asarray(value).dtype


class BufferView(View):
    """A persistent buffer of an `nn.Module`, looked up by name on every access."""

    __slots__ = ("_buffer", "_owner")

    def __init__(self, owner: torch.nn.Module, buffer: str, name: str) -> None:
        super().__init__(name)
        self._owner = owner
        self._buffer = buffer

    def _get(self) -> Any:
        return self._owner._buffers[self._buffer]

    def _write(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                self._get().copy_(value)
        else:
            write_tensor(self._get(), value, self._name)


class ParamState:
    """One parameter's optimizer state, as a restore assigns it (pending until complete)."""

    __slots__ = ("_flag", "_keys", "_optimizer", "_param", "_received", "_staged", "templates")

    def __init__(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, templates: dict[str, Any]
    ) -> None:
        self._optimizer = optimizer
        self._param = param
        self.templates = templates  # key -> value to show while the state does not exist
        self._keys = frozenset(templates) | {None}  # None: the has_state flag
        self._received: set[str | None] = set()
        self._staged: dict[str, Any] = {}
        self._flag: bool | None = None

    def live(self) -> dict[Any, Any] | None:
        state = self._optimizer.state.get(self._param)
        return state if state else None

    def get(self, key: str) -> Any:
        live = self.live()
        return live[key] if live is not None and key in live else self.templates[key]

    def receive(self, key: str | None, value: Any) -> None:
        live = self.live()
        if key is None:
            self._flag = bool(np.asarray(value))
        elif live is not None and key in live:
            current = live[key]
            if isinstance(current, torch.Tensor):
                write_tensor(current, np.asarray(value), key)
            else:
                live[key] = like_python(current, np.asarray(value))
        else:
            template = self.templates[key]
            if isinstance(template, torch.Tensor):
                staged = torch.empty_like(template)
                write_tensor(staged, np.asarray(value), key)
                self._staged[key] = staged
            else:
                self._staged[key] = like_python(template, np.asarray(value))
        self._received.add(key)
        if self._received >= self._keys:
            self._commit()

    def _commit(self) -> None:
        # A checkpoint of a parameter that had no state yet restores to no state, so the
        # next step initialises it exactly as a fresh optimizer would.
        if self._flag:
            if self._staged:
                self._optimizer.state[self._param].update(self._staged)
        else:
            self._optimizer.state.pop(self._param, None)
        self._received.clear()
        self._staged.clear()


class SlotView(View):
    __slots__ = ("_key", "_record")

    def __init__(self, record: ParamState, key: str, name: str) -> None:
        super().__init__(name)
        self._record = record
        self._key = key

    def _get(self) -> Any:
        value = self._record.get(self._key)
        return value if isinstance(value, torch.Tensor) else from_python(value)[()]

    def _write(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = to_numpy_tensor(value)
        self._record.receive(self._key, value)


class FlagView(View):
    __slots__ = ("_record",)

    def __init__(self, record: ParamState, name: str) -> None:
        super().__init__(name)
        self._record = record

    def _get(self) -> Any:
        return np.bool_(self._record.live() is not None)

    def _write(self, value: Any) -> None:
        self._record.receive(None, value)


class EntryView(View):
    """A numeric entry of a dict (a param group) or attribute of an object (a scheduler)."""

    __slots__ = ("_key", "_target")

    def __init__(self, target: Any, key: str, name: str) -> None:
        super().__init__(name)
        self._target = target
        self._key = key

    def _read(self) -> Any:
        if isinstance(self._target, dict):
            return self._target[self._key]
        return getattr(self._target, self._key)

    def _get(self) -> Any:
        value = self._read()
        if isinstance(value, torch.Tensor):
            return value
        array = from_python(value)
        return array[()] if array.ndim == 0 else array

    def _write(self, value: Any) -> None:
        current = self._read()
        if isinstance(current, torch.Tensor):
            write_tensor(current, np.asarray(value), self._name)
            return
        new = like_python(current, np.asarray(value))
        if isinstance(self._target, dict):
            self._target[self._key] = new
        else:
            setattr(self._target, self._key, new)


class GeneratorView(View):
    """A `torch.Generator`'s state (a uint8 tensor), so random streams resume exactly."""

    __slots__ = ("_generator",)

    def __init__(self, generator: torch.Generator, name: str) -> None:
        super().__init__(name)
        self._generator = generator

    def _get(self) -> Any:
        return self._generator.get_state()

    def _write(self, value: Any) -> None:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
        self._generator.set_state(torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)))
