"""What a compiled step gets as its iterator: one batch per step, pulled by the loop.

Every compiled loop pulls each step's batch itself (on the host, or in the graph) and
hands `train_step(iterator)` a `StepIterator` whose `next()` yields that batch once:
the step keeps Orbit's signature while the loop counts the steps that really ran and
keeps the data pipeline out of the compiled code. Framework-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from looproto.errors import ProtocolError

__all__ = ["NO_DATA", "StepIterator", "is_iterator_container"]

NO_DATA: Any = object()
"""The batch of a loop that was given no data iterator (the dataset is None)."""


def is_iterator_container(obj: Any) -> bool:
    """True for a mapping, list or tuple of iterators (not for a namedtuple batch)."""
    return isinstance(obj, Mapping) or (
        isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields")
    )


class StepIterator:
    """`next()` yields this step's batch, once; a second `next()` is a `ProtocolError`.

    Args:
        step_name: The step's name, for messages.
        hint: What to do instead of calling `next` twice on this backend.
        batch: The batch (`NO_DATA` when the loop has no data); `feed` sets the next one.
    """

    __slots__ = ("_batch", "_hint", "_step_name", "_used")

    def __init__(self, step_name: str, hint: str, batch: Any = NO_DATA) -> None:
        self._step_name = step_name
        self._hint = hint
        self._batch = batch
        self._used = False

    def feed(self, batch: Any) -> None:
        """Makes `batch` the one the next `next()` yields."""
        self._batch = batch
        self._used = False

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> Any:
        if self._batch is NO_DATA:
            raise ProtocolError(
                f"`{self._step_name}` called `next(iterator)`, but the loop was given no "
                "data iterator (the dataset is None)."
            )
        if self._used:
            raise ProtocolError(
                f"`{self._step_name}` called `next(iterator)` twice in one step. {self._hint}"
            )
        self._used = True
        return self._batch
