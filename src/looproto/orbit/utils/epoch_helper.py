"""Orbit's `EpochHelper`: epoch bookkeeping from the global step."""

from __future__ import annotations

from typing import Any

from looproto.errors import ConfigError
from looproto.module import read_int

__all__ = ["EpochHelper"]


class EpochHelper:
    """Says when an epoch of `epoch_steps` steps begins and ends, reading the global step.

    Args:
        epoch_steps: Steps in an epoch.
        global_step: The global step (a `tf.Variable`, a `looproto.Variable`, any
            scalar integer variable).
    """

    def __init__(self, epoch_steps: int, global_step: Any) -> None:
        self._epoch_steps = epoch_steps
        self._global_step = global_step
        self._current_epoch: int | None = None
        self._epoch_start_step: int | None = None
        self._in_epoch = False

    def epoch_begin(self) -> bool:
        """True if a new epoch begins now (False while one is running)."""
        if self._in_epoch:
            return False
        step = read_int(self._global_step)
        self._epoch_start_step = step
        self._current_epoch = step // self._epoch_steps
        self._in_epoch = True
        return True

    def epoch_end(self) -> bool:
        """True if the current epoch has ended (the step reached the next epoch).

        Raises:
            ConfigError: Called outside an epoch (before `epoch_begin`).
        """
        if not self._in_epoch:
            raise ConfigError("`epoch_end` can only be called inside an epoch.")
        assert self._current_epoch is not None
        if read_int(self._global_step) // self._epoch_steps > self._current_epoch:
            self._in_epoch = False
            return True
        return False

    @property
    def batch_index(self) -> int:
        """The index of the next batch within the current epoch."""
        assert self._epoch_start_step is not None, "`epoch_begin()` was not called"
        return read_int(self._global_step) - self._epoch_start_step

    @property
    def current_epoch(self) -> int | None:
        """The epoch `epoch_begin` last started, or None."""
        return self._current_epoch
