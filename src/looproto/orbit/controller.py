"""Orbit's `Controller`: `looproto.Controller` with Orbit's arguments and behaviours.

The outer loop is looproto's (its schedule is Orbit's: absolute `train(steps)`,
`steps_per_loop` as an int or a function of the step, evaluation every
`eval_interval`, actions on the raw outputs). On top of it this class keeps what
Orbit code relies on:

* `checkpoint_manager` may be a `tf.train.CheckpointManager` (TensorFlow saves and
  restores it; see `looproto.backends.tensorflow.TfCheckpointManager`), and
  `enable_async_checkpointing` saves it in the background;
* checkpoints are saved only when the manager has a `checkpoint_interval`, the final
  and `save_checkpoint()` saves included (a stop on SIGTERM saves regardless);
* summaries go through `looproto.orbit.utils.SummaryManager` (`tf.summary` writers):
  the loop's output after every inner loop, and the `tf.summary` calls inside the
  steps, which are recorded when the global step is a multiple of `summary_interval`
  (never without one); the global step is `tf.summary`'s default step;
* the trainer and evaluator get `num_steps` as a `tf.int32` scalar tensor (looproto's
  own runners, which take ints, get an int).

looproto adds to Orbit's: SIGTERM/SIGINT during training finishes the inner loop,
saves and raises `looproto.Preempted`; training stops when the data ends or the global
step stops moving; after a restore, a manager's `step_counter` must read the
checkpoint's number.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import tensorflow as tf

import looproto
from looproto import backends, preemption
from looproto import controller as _core
from looproto import runner as _core_runner
from looproto.backends.tensorflow import TfCheckpointManager
from looproto.checkpoint import CheckpointManager
from looproto.errors import ConfigError, value_repr
from looproto.orbit import runner
from looproto.orbit._values import as_int, step_value
from looproto.orbit.utils.summary_manager import SummaryManager

__all__ = ["Action", "Controller", "StepTimer"]

_log = logging.getLogger("looproto")

Action = Callable[[runner.Output], None]
"""Called with the raw output of each inner loop (train actions) or evaluation."""

StepTimer = _core.StepTimer


class Controller(_core.Controller):
    """Runs Orbit's outer loop: train, evaluate, write summaries, checkpoint, act.

    All arguments are keyword-only, in Orbit's order. See the module docstring for
    what this class keeps of Orbit and adds to it, and `looproto.Controller` for the
    loop itself.

    Args:
        global_step: The step counter the trainer advances: a `tf.Variable` (e.g.
            `optimizer.iterations`, `orbit.utils.create_global_step()`), or any scalar
            integer variable looproto knows.
        trainer: The trainer (`train(num_steps)`).
        evaluator: The evaluator (`evaluate(num_steps)`).
        strategy: The `tf.distribute.Strategy` whose scope restores run in (default
            the current one).
        train_actions: Called with each inner loop's output.
        eval_actions: Called with each evaluation's output.
        steps_per_loop: Steps per `trainer.train` call: an int, or a function of the
            global step. Required with a trainer.
        checkpoint_manager: A `tf.train.CheckpointManager` or a
            `looproto.CheckpointManager`; the latest checkpoint is restored now.
        enable_async_checkpointing: Save `tf.train.CheckpointManager` checkpoints in
            the background (a `looproto.CheckpointManager` takes `enable_async=True`
            itself).
        summary_interval: Record the `tf.summary` calls inside the steps when the
            global step is a multiple of this; a multiple of an int `steps_per_loop`.
        summary_dir: Where train summaries go (none if None).
        eval_summary_dir: Where eval summaries go; default `summary_dir`, which then
            shares the train summaries' writer.
        summary_manager: Used instead of a `SummaryManager` of `summary_dir`.
        eval_summary_manager: Used instead of a `SummaryManager` of `eval_summary_dir`.
        preemption_signals: See `looproto.Controller`.

    Raises:
        ConfigError: An argument is invalid (a `ValueError`, as Orbit's errors are).
        ProtocolError: The trainer, evaluator or a manager lacks what it needs.
    """

    def __init__(
        self,
        *,
        global_step: Any,
        trainer: Any = None,
        evaluator: Any = None,
        strategy: Any = None,
        train_actions: Iterable[Action] | None = None,
        eval_actions: Iterable[Action] | None = None,
        steps_per_loop: int | Callable[[int], int] | None = None,
        checkpoint_manager: Any = None,
        enable_async_checkpointing: bool = False,
        summary_interval: int | None = None,
        summary_dir: str | None = None,
        eval_summary_dir: str | None = None,
        summary_manager: Any = None,
        eval_summary_manager: Any = None,
        preemption_signals: Iterable[int] | None = preemption.DEFAULT_SIGNALS,
    ) -> None:
        if not isinstance(enable_async_checkpointing, bool):
            raise ConfigError(
                "`enable_async_checkpointing` must be a bool; received "
                f"enable_async_checkpointing={value_repr(enable_async_checkpointing)}."
            )
        if isinstance(checkpoint_manager, tf.train.CheckpointManager):
            checkpoint_manager = TfCheckpointManager(
                checkpoint_manager, enable_async=enable_async_checkpointing
            )
        elif isinstance(checkpoint_manager, CheckpointManager) and enable_async_checkpointing:
            raise ConfigError(
                "`enable_async_checkpointing=True` with a `looproto.CheckpointManager`: "
                "pass `enable_async=True` to the `looproto.CheckpointManager` instead."
            )
        summary_interval = as_int(summary_interval, "summary_interval")
        steps_per_loop = as_int(steps_per_loop, "steps_per_loop")
        # Orbit's summary managers: the train one when there is a trainer; the eval one
        # shares it when both directories are the same.
        train_summaries: Any = _as_manager(summary_manager) or SummaryManager(
            summary_dir if trainer is not None else None,
            tf.summary.scalar,
            global_step=global_step,
        )
        eval_summaries = _as_manager(eval_summary_manager)
        eval_summary_dir = eval_summary_dir or summary_dir
        if eval_summaries is None and evaluator is not None:
            if eval_summary_dir == summary_dir and trainer is not None:
                eval_summaries = train_summaries
            else:
                eval_summaries = SummaryManager(
                    eval_summary_dir, tf.summary.scalar, global_step=global_step
                )
        if isinstance(global_step, (tf.Variable, looproto.Variable)):
            # In-step `tf.summary` calls without a `step` use the global step. (The
            # TensorFlow backend makes TensorFlow read a `looproto.Variable`'s value in
            # the graph: its `tf.Variable` twin inside a loop.)
            backends.get("tensorflow")
            tf.summary.experimental.set_step(global_step)
        self.enable_async_checkpointing = enable_async_checkpointing
        super().__init__(
            global_step=global_step,
            trainer=trainer,
            evaluator=evaluator,
            strategy=strategy or tf.distribute.get_strategy(),
            train_actions=train_actions,
            eval_actions=eval_actions,
            steps_per_loop=steps_per_loop,
            checkpoint_manager=checkpoint_manager,
            summary_interval=summary_interval,
            summary_dir=summary_dir,
            eval_summary_dir=eval_summary_dir,
            summary_manager=train_summaries,
            eval_summary_manager=eval_summaries,
            preemption_signals=preemption_signals,
        )

    # ---------------------------------------------------------------- public

    def train(self, steps: Any, checkpoint_at_completion: bool = True) -> None:
        """Trains until the global step reaches `steps` (an int or integer tensor)."""
        super().train(as_int(steps, "steps"), checkpoint_at_completion)

    def evaluate(self, steps: Any = -1) -> Any:
        """Runs one evaluation of `steps` steps (`-1`: until the data ends)."""
        return super().evaluate(as_int(steps, "steps"))

    def train_and_evaluate(
        self, train_steps: Any, eval_steps: Any = -1, eval_interval: Any = None
    ) -> Any:
        """Trains to `train_steps`, evaluating every `eval_interval` steps and at the end."""
        return super().train_and_evaluate(
            as_int(train_steps, "train_steps"),
            as_int(eval_steps, "eval_steps"),
            as_int(eval_interval, "eval_interval"),
        )

    def evaluate_continuously(
        self,
        steps: Any = -1,
        timeout: float | None = None,
        timeout_fn: Callable[[], bool] | None = None,
    ) -> Any:
        """Evaluates every new checkpoint in the checkpoint directory (see Orbit's)."""
        manager = self.checkpoint_manager
        if not isinstance(manager, TfCheckpointManager) or self.evaluator is None:
            return super().evaluate_continuously(as_int(steps, "steps"), timeout, timeout_fn)
        output = None
        for path in tf.train.checkpoints_iterator(
            manager.directory, timeout=timeout, timeout_fn=timeout_fn
        ):
            self.restore_checkpoint(path)
            output = self.evaluate(steps)
        return output

    # --------------------------------------------------------------- private

    def _run_trainer(self, num_steps: int) -> Any:
        assert self.trainer is not None
        with _default_writer(self.summary_manager), tf.summary.record_if(self._record_in_steps()):
            return self.trainer.train(_num_steps_for(self.trainer, num_steps))

    def _run_evaluator(self, steps: int) -> Any:
        assert self.evaluator is not None
        with _default_writer(self.eval_summary_manager):
            return self.evaluator.evaluate(_num_steps_for(self.evaluator, steps))

    def _record_in_steps(self) -> Any:
        """`tf.summary.record_if`'s condition for the summaries inside the steps."""
        interval = self.summary_interval
        if not interval:
            return False
        step = self.global_step
        return lambda: step_value(step) % interval == 0

    def _summary_due(self, old_step: int, new_step: int) -> bool:
        # Orbit writes the loop's output after every inner loop.
        return True

    def _maybe_save_checkpoint(
        self, check_interval: bool = True, metrics: Any = None
    ) -> str | None:
        manager = self.checkpoint_manager
        if manager is None:
            return None
        if not manager.checkpoint_interval and not preemption.requested():
            # Orbit saves only with a `checkpoint_interval`; a stop request saves anyway.
            return None
        return super()._maybe_save_checkpoint(check_interval, metrics)


def _default_writer(manager: Any) -> Any:
    """The manager's `tf.summary` writer as the default one, for the steps' summaries.

    A manager without `summary_writer()` (core `looproto.SummaryManager`, which writes
    with tensorboardX) gives the steps no writer: their `tf.summary` calls record nothing.
    """
    summary_writer = getattr(manager, "summary_writer", None)
    if summary_writer is None:
        return contextlib.nullcontext()
    return summary_writer().as_default()


def _num_steps_for(runner_: Any, num_steps: int) -> Any:
    """Orbit's `num_steps`, a `tf.int32` tensor; an int for looproto's own runners."""
    core = (_core_runner.AbstractTrainer, _core_runner.AbstractEvaluator)
    orbit = (runner.AbstractTrainer, runner.AbstractEvaluator)
    core_runner, orbit_runner = isinstance(runner_, core), isinstance(runner_, orbit)
    if core_runner and not orbit_runner:
        return num_steps
    return tf.convert_to_tensor(num_steps, dtype=tf.int32)


class _SummaryManagerAdapter:
    """An Orbit `SummaryManagerInterface` implementation, as `looproto.Controller` calls it."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def summary_writer(self, relative_path: str = "") -> Any:
        return self.manager.summary_writer(relative_path)

    def write_summaries(self, summary_dict: Any, step: Any = None) -> None:
        self.manager.write_summaries(summary_dict)

    def flush(self) -> None:
        self.manager.flush()

    def sync(self) -> None:
        self.manager.flush()

    def close(self) -> None:
        self.manager.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["manager"], name)


def _as_manager(manager: Any) -> Any:
    """A summary manager the core calls: as is when it has `sync`/`close`, else adapted."""
    if manager is None:
        return None
    if all(callable(getattr(manager, name, None)) for name in ("write_summaries", "sync", "close")):
        return manager
    if callable(getattr(manager, "summary_writer", None)):
        return _SummaryManagerAdapter(manager)
    return manager  # the core's check names what is missing
