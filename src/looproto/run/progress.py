"""`Progress`: a live progress bar for training, with steps/s, ETA and the latest outputs.

`Progress` is a train action (`Controller(train_actions=[progress])`): after each
inner loop it reads the global step and redraws the bar. It draws with `rich`
(`pip install 'looproto[cli]'`). The `looproto train` command shows it when standard
error is a terminal; elsewhere (CI, a log file) the Controller's log lines, which carry
steps/s, the ETA and the outputs too, are the plain-text progress report.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from looproto import _nest
from looproto.errors import BackendNotAvailableError
from looproto.module import variable_to_numpy

__all__ = ["Progress", "available", "format_outputs"]


def available() -> bool:
    """Whether `rich`, which draws the bar, is installed."""
    return importlib.util.find_spec("rich") is not None


def format_outputs(output: Mapping[str, Any], limit: int = 4) -> str:
    """`"loss 0.0134, metrics/mae 0.07"`: the first `limit` scalar outputs, flattened.

    Example:
        >>> format_outputs({"loss": np.float32(0.25), "metrics": {"mae": 0.125}})
        'loss 0.25, metrics/mae 0.125'
    """
    items = []
    for path, leaf in _nest.flatten_with_paths(output):
        value = np.asarray(_nest.to_numpy_leaf(leaf))
        if value.size == 1 and np.issubdtype(value.dtype, np.number):
            items.append(f"{_nest.path_to_str(path)} {float(value.reshape(())):.4g}")
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


class Progress:
    """A train action that draws training's progress towards `total_steps`.

    Args:
        global_step: The step variable the trainer advances.
        total_steps: The step training stops at (None or -1: unknown; no bar length).
        stream: Where to draw (default: standard error).

    Raises:
        BackendNotAvailableError: `rich` is not installed.
    """

    def __init__(
        self, global_step: Any, total_steps: int | None, *, stream: IO[str] | None = None
    ) -> None:
        if not available():
            raise BackendNotAvailableError(
                "The progress bar needs `rich`. Install it with: pip install 'looproto[cli]'"
            )
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._global_step = global_step
        self.console = Console(file=stream, stderr=stream is None)
        self._progress = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} steps/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[outputs]}"),
            console=self.console,
        )
        total = total_steps if total_steps is not None and total_steps > 0 else None
        self._start_step = self._read()
        self._start_time = time.perf_counter()
        self._task = self._progress.add_task(
            "train", total=total, completed=self._start_step, rate=0.0, outputs=""
        )
        self._progress.start()

    def _read(self) -> int:
        return int(np.asarray(variable_to_numpy(self._global_step)))

    def __call__(self, output: Mapping[str, Any]) -> None:
        """Redraws the bar at the current step with `output`'s scalars."""
        step = self._read()
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=step, rate=rate, outputs=format_outputs(output))

    def close(self) -> None:
        """Stops drawing; the last state of the bar stays on screen."""
        self._progress.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
