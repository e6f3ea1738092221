"""Private: `StepTimer` and the log formatting of the `Controller`."""

from __future__ import annotations

import pprint
import time
from typing import Any

from looproto.module import read_int

__all__ = ["Formatted", "StepTimer", "eta"]


class Formatted:
    """`pprint` of an output, computed only if a log record is actually emitted."""

    __slots__ = ("_output",)

    def __init__(self, output: Any) -> None:
        self._output = output

    def __str__(self) -> str:
        text = pprint.pformat(self._output)
        if "\n" in text:
            text = "\n" + "\n".join("    " + line for line in text.splitlines())
        return text


def eta(remaining_steps: int | None, steps_per_second: float) -> str:
    """`"0:01:05"` for the remaining steps at this rate; `"?"` when unknown."""
    if remaining_steps is None or steps_per_second <= 0:
        return "?"
    seconds = round(max(remaining_steps, 0) / steps_per_second)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepTimer:
    """Measures steps per second between calls.

    Each method takes the current step if the caller already read it: on a framework
    variable a read is a device round trip (~25 µs on TensorFlow), and the outer
    loop needs the step anyway.
    """

    def __init__(self, step: Any) -> None:
        self.step = step
        self.start()

    def start(self, current_step: int | None = None) -> None:
        """Restarts the measurement at the current step and time."""
        self.last_iteration = read_int(self.step) if current_step is None else current_step
        self.last_time = time.perf_counter()

    def steps_per_second(self, restart: bool = True, current_step: int | None = None) -> float:
        """Steps per second since the last `start()`."""
        now = time.perf_counter()
        step = read_int(self.step) if current_step is None else current_step
        value = (step - self.last_iteration) / max(now - self.last_time, 1e-12)
        if restart:
            self.last_iteration, self.last_time = step, now
        return value
