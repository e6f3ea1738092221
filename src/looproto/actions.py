"""Ready-made actions for `Controller(train_actions=..., eval_actions=...)`.

An action is any callable taking the output of an inner loop (train actions) or
of an evaluation (eval actions). `ConditionalAction`, `NewBestMetric`,
`JSONPersistedValue` and `SaveCheckpointIfPreempted` are Orbit's; `PeriodicAction`
runs an action at its own interval, decoupled from `steps_per_loop` (Orbit's
`PeriodicAction` takes other arguments and fires only on exact multiples).
`EarlyStopping` ends training when a metric stops improving (`Controller.stop()`), and
`LearningRateMonitor` summarises what each optimizer applies next.

(The file runs past 500 lines: it is the one catalogue of ready-made actions, each
small, with its rules in its docstring.)
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from looproto import _nest, _recording, backends, distributed, preemption
from looproto._validate import positive_int, positive_number
from looproto.backends.base import SupportsHyperparameters
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module import read_int
from looproto.runner import Output

__all__ = [
    "ConditionalAction",
    "EarlyStopping",
    "JSONPersistedValue",
    "LearningRateMonitor",
    "NewBestMetric",
    "PeriodicAction",
    "SaveCheckpointIfPreempted",
    "hyperparameters",
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


def _output_value(output: Output, metric: str | MetricFn, argument: str = "metric") -> float:
    """The metric read from `output` (`"a/b"` reads a nested key), as a Python float."""
    if callable(metric):
        value = metric(output)
    else:
        try:
            value = _nest.lookup(output, metric)
        except KeyError:
            raise ConfigError(
                f"`{argument}` {metric!r} is not in the output; keys are "
                f"{sorted(_nest.path_to_str(p) for p, _ in _nest.flatten_with_paths(output))}."
            ) from None
    return float(np.asarray(_nest.to_numpy_leaf(value)))


class EarlyStopping:
    """Stops training when a metric has not improved for `patience` evaluations.

    Use it as an eval action (or as a train action, to watch the training output):
    after each evaluation it compares the metric with the best value so far, and when
    `patience` evaluations in a row did not improve on it by more than `min_delta`, it
    calls `Controller.stop()`: training ends cleanly, the final checkpoint is saved,
    and `looproto train` exits with status 0. A NaN or infinite metric stops at once
    (`stop_on_nonfinite`).

    With `filename`, the history of values (by global step) is kept in that JSON
    file: a run that was preempted and resumed goes on counting where it left off
    (values recorded after the restored step are dropped and recorded again), and a
    run that had stopped stops again when it is started once more, before training.
    Without it, the counting starts afresh with each process. In a multi-process run
    every process reads the file and the chief alone writes it.

    Example:
        >>> early = EarlyStopping("eval_loss", mode="min", patience=2)
        >>> for loss in [1.0, 0.5, 0.6, 0.55]:
        ...     early({"eval_loss": loss})
        >>> early.should_stop, early.best_value, early.wait
        (True, 0.5, 2)

    Args:
        metric: An output key (`"metrics/accuracy"` reads a nested one) or a callable
            of the output returning a number.
        mode: `"min"` (lower is better, e.g. a loss) or `"max"`.
        patience: Evaluations without improvement before stopping.
        min_delta: The least change that counts as an improvement.
        baseline: A value the metric must beat; until it does, no evaluation counts as
            an improvement.
        stop_on_nonfinite: Stop as soon as the metric is NaN or infinite.
        filename: A JSON file keeping the history across restarts.

    Raises:
        ConfigError: An argument is invalid.
    """

    def __init__(
        self,
        metric: str | MetricFn,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        baseline: float | None = None,
        stop_on_nonfinite: bool = True,
        filename: str | None = None,
    ) -> None:
        if not (isinstance(metric, str) and metric) and not callable(metric):
            raise ConfigError(
                f"`metric` must be an output key or a callable; received {value_repr(metric)}."
            )
        if mode not in ("min", "max"):
            raise ConfigError(f"`mode` must be 'min' or 'max'; received mode={mode!r}.")
        positive_int(patience, "patience")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ConfigError(
                f"`min_delta` must be a number >= 0; received min_delta={value_repr(min_delta)}."
            )
        if baseline is not None and (
            isinstance(baseline, bool) or not isinstance(baseline, (int, float))
        ):
            raise ConfigError(
                f"`baseline` must be a number or None; received baseline={value_repr(baseline)}."
            )
        if not isinstance(stop_on_nonfinite, bool):
            raise ConfigError(
                "`stop_on_nonfinite` must be a bool; received "
                f"stop_on_nonfinite={value_repr(stop_on_nonfinite)}."
            )
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.baseline = None if baseline is None else float(baseline)
        self.stop_on_nonfinite = stop_on_nonfinite
        # Every process reads the file, the chief alone writes it (the run's files are its).
        self._history = JSONPersistedValue(
            {"history": []}, filename, write_value=distributed.is_chief()
        )
        self._controller: Any = None
        self._reason: str | None = None

    def set_controller(self, controller: Any) -> None:
        """Binds the `Controller` to stop (it calls this when it is created).

        A history kept in `filename` that already says "stop" (up to the restored
        global step) stops the controller's next run at its start.
        """
        self._controller = controller
        step = read_int(controller.global_step)
        history = [entry for entry in self._entries() if entry[0] <= step]
        reason = self._decide(history)
        if reason is not None:
            self._reason = reason
            controller.stop(f"early stopping (at an earlier run): {reason}")

    def __call__(self, output: Output) -> None:
        value = _output_value(output, self.metric)
        entries = self._entries()
        if self._controller is not None:
            step = read_int(self._controller.global_step)
        else:
            step = entries[-1][0] + 1 if entries else 0
        # After a restore, the values past the restored step are recorded anew.
        entries = [entry for entry in entries if entry[0] < step]
        entries.append((step, value))
        self._history.write({"history": [[s, v] for s, v in entries]})
        reason = self._decide(entries)
        if reason is not None and self._reason is None:
            self._reason = reason
            if self._controller is not None:
                self._controller.stop(f"early stopping: {reason}")

    def _entries(self) -> list[tuple[int, float]]:
        return [(int(s), float(v)) for s, v in self._history.read()["history"]]

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _best_and_wait(self, entries: list[tuple[int, float]]) -> tuple[float | None, int]:
        """The best value (None until one beats `baseline`) and evaluations since it."""
        best, wait, improved = self.baseline, 0, False
        for _, value in entries:
            if math.isfinite(value) and self._improves(value, best):
                best, wait, improved = value, 0, True
            else:
                wait += 1
        return (best if improved else None), wait

    def _decide(self, entries: list[tuple[int, float]]) -> str | None:
        """Why to stop after `entries` (step, value), or None."""
        if not entries:
            return None
        step, value = entries[-1]
        name = self.metric if isinstance(self.metric, str) else "the metric"
        if self.stop_on_nonfinite and not math.isfinite(value):
            return f"{name} is {value} at step {step}"
        best, wait = self._best_and_wait(entries)
        if wait >= self.patience:
            than = f"the best, {best:.6g}" if best is not None else f"the baseline {self.baseline}"
            return (
                f"{name} has not improved on {than} (by more than min_delta={self.min_delta:g}) "
                f"in {wait} evaluations (patience {self.patience})"
            )
        return None

    @property
    def should_stop(self) -> bool:
        """Whether the values so far say stop (also without a Controller)."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why it stopped training (None while it has not)."""
        return self._reason

    @property
    def best_value(self) -> float | None:
        """The best value so far (None before the first, or until `baseline` is beaten)."""
        return self._best_and_wait(self._entries())[0]

    @property
    def wait(self) -> int:
        """Evaluations since the last improvement."""
        return self._best_and_wait(self._entries())[1]


class LearningRateMonitor:
    """A train action that summarises what each optimizer applies next (learning rate, ...).

    After each inner loop it reads every optimizer's hyper-parameters and records them
    as in-step summaries (`looproto.summary.scalar`), which the `Controller` writes with
    that loop's summaries (under `summary_interval`), at the loop's last step. The
    names are the same on every backend: `learning_rate`, `weight_decay`, `momentum`,
    `beta_1`, `beta_2` (those the optimizer has).

    What it reads, by optimizer:

    * a `torch.optim.Optimizer` (or an LR scheduler, for its optimizer): each param
      group's values, which a scheduler stepped after `optimizer.step()` has set for
      the next step; groups after the first add `/group_<i>` to the names;
    * a Keras optimizer (Keras on TensorFlow): `learning_rate` (its schedule at the
      optimizer's `iterations`, the next step's) and the other attributes;
    * an optax state made with `optax.inject_hyperparams` (its leaves arrays or
      `looproto.Variable`s): its `hyperparams`, which optax computes at the start of
      each update, so they are the values of the update that ran last;
    * a `looproto.portable` optimizer, or any object with a `hyperparameters()`
      method returning a mapping of names to numbers.

    Args:
        optimizers: One optimizer, or a mapping of names to optimizers (each name
            prefixes its tags: `"encoder/learning_rate"`).
        names: Which hyper-parameters to summarise (default: every one reported).

    Raises:
        ConfigError: `optimizers` is empty or `names` is not a sequence of strings.
    """

    def __init__(self, optimizers: Any, names: Sequence[str] | None = None) -> None:
        if isinstance(optimizers, Mapping):
            if not optimizers:
                raise ConfigError("`optimizers` is an empty mapping; pass at least one.")
            self.optimizers: dict[str, Any] = {str(k): v for k, v in optimizers.items()}
        else:
            self.optimizers = {"": optimizers}
        if names is not None and (
            isinstance(names, str) or not all(isinstance(n, str) for n in names)
        ):
            raise ConfigError(
                f"`names` must be a sequence of hyper-parameter names; received {names!r}."
            )
        self.names = None if names is None else tuple(names)

    def values(self) -> dict[str, float]:
        """Every optimizer's hyper-parameters now, by tag.

        Raises:
            ProtocolError: An optimizer is of a kind no backend knows.
        """
        out: dict[str, float] = {}
        for prefix, optimizer in self.optimizers.items():
            for name, value in hyperparameters(optimizer).items():
                if self.names is None or name.partition("/")[0] in self.names:
                    out[f"{prefix}/{name}" if prefix else name] = value
        return out

    def __call__(self, output: Output) -> None:
        for tag, value in self.values().items():
            _recording.record(_recording.SCALAR, tag, value)


def hyperparameters(optimizer: Any) -> dict[str, float]:
    """What `optimizer` applies at its next update, by name (see `LearningRateMonitor`).

    Raises:
        ProtocolError: No backend knows `optimizer`, and it has no `hyperparameters()`.
    """
    own = getattr(optimizer, "hyperparameters", None)
    if callable(own):
        return {str(k): float(np.asarray(_nest.to_numpy_leaf(v))) for k, v in own().items()}
    found = _framework_hyperparameters(optimizer)
    if found is None:
        raise ProtocolError(
            f"{value_repr(optimizer)} of type {type(optimizer).__qualname__} is not an optimizer "
            "looproto can read: expected a torch optimizer or LR scheduler, a Keras optimizer, "
            "an optax state of `optax.inject_hyperparams`, a `looproto.portable` optimizer, or "
            "an object with a `hyperparameters()` method."
        )
    return found


def _framework_hyperparameters(obj: Any) -> dict[str, float] | None:
    for backend in backends.for_object(obj):
        if isinstance(backend, SupportsHyperparameters):
            found = backend.hyperparameters(obj)
            if found is not None:
                return found
    if isinstance(obj, (list, tuple)):  # a chain of states (optax's `chain`)
        merged: dict[str, float] = {}
        for item in obj:
            merged.update(_framework_hyperparameters(item) or {})
        return merged or None
    return None
