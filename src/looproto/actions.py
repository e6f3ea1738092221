"""Ready-made actions for `Controller(train_actions=..., eval_actions=...)`.

An action is any callable taking the output of an inner loop (train actions) or
of an evaluation (eval actions). `ConditionalAction`, `NewBestMetric`,
`JSONPersistedValue` and `SaveCheckpointIfPreempted` are Orbit's; `PeriodicAction`
runs an action at its own interval, decoupled from `steps_per_loop` (Orbit's
`PeriodicAction` takes other arguments and fires only on exact multiples).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from looproto import preemption
from looproto._validate import positive_int, positive_number
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module import read_int
from looproto.runner import Output

__all__ = [
    "ConditionalAction",
    "JSONPersistedValue",
    "NewBestMetric",
    "PeriodicAction",
    "SaveCheckpointIfPreempted",
]

Condition = Callable[[Output], Any]
MetricFn = Callable[[Output], Any]


def _as_sequence(action: Any) -> Sequence[Callable[[Output], None]]:
    return action if isinstance(action, Sequence) else [action]


class ConditionalAction:
    """Runs `action` (or each of a sequence of actions) when `condition(output)` is true.

    Example:
        >>> calls = []
        >>> act = ConditionalAction(lambda out: out["loss"] < 1.0, calls.append)
        >>> act({"loss": 2.0}); act({"loss": 0.5})
        >>> calls
        [{'loss': 0.5}]
    """

    def __init__(
        self,
        condition: Condition,
        action: Callable[[Output], None] | Sequence[Callable[[Output], None]],
    ) -> None:
        if not callable(condition):
            raise ConfigError(f"`condition` must be callable; received {value_repr(condition)}.")
        for each in _as_sequence(action):
            if not callable(each):
                raise ConfigError(f"`action` must be callable; received {value_repr(each)}.")
        self.condition = condition
        self.action = action

    def __call__(self, output: Output) -> None:
        if self.condition(output):
            for action in _as_sequence(self.action):
                action(output)


class PeriodicAction:
    """Runs `action` every `every_n_steps` global steps and/or every `every_n_seconds`.

    The action fires when a multiple of `every_n_steps` is *crossed* since the last
    call, not only when the step lands exactly on one, so it works with any
    `steps_per_loop` (and a callable one). On its first call it fires if the step
    is a multiple of `every_n_steps` (or if `every_n_seconds` is set).
    """

    def __init__(
        self,
        action: Callable[[Output], None],
        global_step: Any,
        *,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
    ) -> None:
        if not callable(action):
            raise ConfigError(f"`action` must be callable; received {value_repr(action)}.")
        if every_n_steps is None and every_n_seconds is None:
            raise ConfigError("Pass `every_n_steps`, `every_n_seconds`, or both.")
        positive_int(every_n_steps, "every_n_steps", allow_none=True)
        if every_n_seconds is not None:
            positive_number(every_n_seconds, "every_n_seconds")
        self.action = action
        self.global_step = global_step
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._last_bucket: int | None = None
        self._last_time: float | None = None

    def __call__(self, output: Output) -> None:
        fire = False
        if self.every_n_steps is not None:
            step = read_int(self.global_step)
            bucket = math.floor(step / self.every_n_steps)
            if self._last_bucket is None:
                fire = step % self.every_n_steps == 0
            else:
                fire = bucket > self._last_bucket
            self._last_bucket = bucket
        if self.every_n_seconds is not None:
            now = time.monotonic()
            if self._last_time is None or now - self._last_time >= self.every_n_seconds:
                fire = True
        if fire:
            self._last_time = time.monotonic()
            self.action(output)


class JSONPersistedValue:
    """A JSON-serialisable value, optionally kept in a file (written atomically)."""

    def __init__(self, initial_value: Any, filename: str | None, write_value: bool = True):
        self._value: Any = None
        self._filename = filename
        self._write_value = write_value
        if filename is not None:
            if os.path.isfile(filename) and os.path.getsize(filename) > 0:
                with open(filename) as f:
                    self._value = json.load(f)
            elif not os.path.exists(filename) and write_value:
                os.makedirs(os.path.dirname(filename) or ".", exist_ok=True)
        if self._value is None:
            self.write(initial_value)

    def read(self) -> Any:
        """The current value."""
        return self._value

    def write(self, value: Any) -> None:
        """Sets the value, and persists it if a file was given and writing is on."""
        self._value = value
        if self._filename is not None and self._write_value:
            directory = os.path.dirname(self._filename) or "."
            fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=directory)
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, self._filename)


class NewBestMetric:
    """A condition that is true when an output improves on the best value so far.

    Typical use, exporting the best model: `ConditionalAction(NewBestMetric("accuracy"),
    export)`. With `filename`, the best value survives restarts.

    Example:
        >>> best = NewBestMetric("loss", higher_is_better=False)
        >>> best({"loss": 0.5}), best({"loss": 0.7}), best({"loss": 0.4})
        (True, False, True)
    """

    def __init__(
        self,
        metric: str | MetricFn,
        higher_is_better: bool = True,
        filename: str | None = None,
        write_metric: bool = True,
    ) -> None:
        if not (isinstance(metric, str) or callable(metric)):
            raise ConfigError(
                f"`metric` must be an output key or a callable; received {value_repr(metric)}."
            )
        self.metric = metric
        self.higher_is_better = higher_is_better
        initial = -sys.float_info.max if higher_is_better else sys.float_info.max
        self._best_value = JSONPersistedValue(initial, filename, write_value=write_metric)

    def __call__(self, output: Output) -> bool:
        return self.commit(output)

    @property
    def best_value(self) -> float:
        """The best value committed so far."""
        return float(self._best_value.read())

    def metric_value(self, output: Output) -> float:
        """The metric read from `output`, as a Python float."""
        if callable(self.metric):
            value = self.metric(output)
        else:
            if self.metric not in output:
                raise ConfigError(
                    f"`metric` {self.metric!r} is not in the output; keys are {sorted(output)}."
                )
            value = output[self.metric]
        return float(np.asarray(value))

    def test(self, output: Output) -> bool:
        """Whether `output` is strictly better than the best so far (records nothing)."""
        value = self.metric_value(output)
        if self.higher_is_better:
            return value > self.best_value
        return value < self.best_value

    def commit(self, output: Output) -> bool:
        """Like `test`, and records the value when it is better."""
        if self.test(output):
            self._best_value.write(self.metric_value(output))
            return True
        return False


class SaveCheckpointIfPreempted:
    """Saves a checkpoint when preemption was requested; then stops training, or not.

    Orbit's action, without TensorFlow's cluster resolver: the request comes from a
    signal handled by `looproto.preemption.watch()` (the `Controller` installs one
    during training, see `Controller(preemption_signals=...)`) or from
    `looproto.preemption.request()`. Use it as a train action::

        Controller(..., train_actions=[SaveCheckpointIfPreempted(manager)])

    The `Controller` itself already saves and stops on a request; this action is for
    ports of Orbit code, for `keep_running_after_save=True`, and for checkpoint
    managers the Controller does not own.

    Args:
        checkpoint_manager: The manager to save with (`looproto.CheckpointManager` or
            anything with `save(checkpoint_number, check_interval)` and `sync()`).
        checkpoint_number: The step to number the checkpoint by (an int or a scalar
            variable, read when saving); default the manager's step counter.
        keep_running_after_save: After saving, keep training instead of raising
            `Preempted` (the platform is expected to end the process itself).

    Raises:
        ProtocolError: `checkpoint_manager` has no `save`/`sync` methods.
    """

    def __init__(
        self,
        checkpoint_manager: Any,
        checkpoint_number: Any = None,
        keep_running_after_save: bool = False,
    ) -> None:
        if not all(callable(getattr(checkpoint_manager, name, None)) for name in ("save", "sync")):
            raise ProtocolError(
                "`checkpoint_manager` must have `save(checkpoint_number, check_interval)` and "
                f"`sync()` methods (a `looproto.CheckpointManager`); received "
                f"{value_repr(checkpoint_manager)}."
            )
        if not isinstance(keep_running_after_save, bool):
            raise ConfigError(
                "`keep_running_after_save` must be a bool; received "
                f"keep_running_after_save={value_repr(keep_running_after_save)}."
            )
        self.checkpoint_manager = checkpoint_manager
        self.checkpoint_number = checkpoint_number
        self.keep_running_after_save = keep_running_after_save

    def __call__(self, output: Output) -> None:
        if not preemption.requested():
            return
        signal_number = preemption.signal_received()
        number = None if self.checkpoint_number is None else read_int(self.checkpoint_number)
        manager = self.checkpoint_manager
        path = manager.save(checkpoint_number=number, check_interval=False)
        manager.sync()  # on disk before the process may end
        if path is None:
            # Already saved at this step (an interval save): that checkpoint holds it.
            path = getattr(manager, "latest_checkpoint", None)
        if self.keep_running_after_save:
            preemption.clear()  # training goes on: a later signal is a first one again
            return
        preemption.acknowledge()
        step = number
        if step is None:  # numbered by the manager's step counter: read it off the path
            name = os.path.basename(os.fspath(path)) if path is not None else ""
            step = int(name) if name.isdigit() else -1
        raise preemption.Preempted(step, signal_number, None if path is None else str(path))
