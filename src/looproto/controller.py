"""The `Controller`: the outer training loop.

Training is two nested loops. The *inner* loop runs `steps_per_loop` steps inside
the trainer, compiled by its backend into as few framework calls as possible
(`Trainer.train(num_steps)`). The *outer* loop, here, calls it repeatedly and,
between calls, does everything that needs the host: logging, summaries,
checkpoints, actions, and evaluation. A larger `steps_per_loop` means fewer
host round-trips and a faster run; a smaller one means finer-grained summaries
and checkpoints.

This is Orbit's `Controller` (TensorFlow Models), framework-agnostic: the global
step is any variable holding a scalar integer (`looproto.create_global_step()`),
checkpoints go through orbax (`looproto.CheckpointManager`) and summaries through
tensorboardX (`looproto.SummaryManager`).

The file runs past 500 lines because the `Controller` is one concept whose public
methods carry Orbit-length docstrings; its argument checks (`_controller_checks.py`) and
its step timer (`_step_timer.py`) live apart.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import numpy as np

from looproto import _nest, _recording, preemption
from looproto._controller_checks import (
    CheckpointManagerLike,
    check_actions,
    check_global_step,
    check_outputs,
    check_restored_step,
    check_runners,
    check_step_agrees,
    check_steps,
    checkpoint_number,
)
from looproto._step_timer import Formatted, StepTimer, eta
from looproto.errors import CheckpointError, ConfigError, NonFiniteError, ProtocolError
from looproto.module import read_int
from looproto.runner import Evaluator, Output, Trainer
from looproto.summary import SummaryManager

__all__ = ["Action", "CheckpointManagerLike", "Controller", "StepTimer"]

_log = logging.getLogger("looproto")

Action = Callable[[Output], None]
"""Called after each inner loop (train actions) or evaluation (eval actions) with
the raw output of `train()`/`evaluate()` (`{}` when it returned None). An action that
needs its `Controller` (to `stop()` it, say) defines `set_controller(controller)`,
which the Controller calls once, when it is created."""

MSG_STEP_NOT_ADVANCED: Final = (
    "`trainer.train({num_steps})` did not advance `global_step` (it stayed at {step}). "
    "Either the training data ended, or the trainer never increments the global step. "
    "A trainer must advance the step it was given to the `Controller` by the number of "
    "steps it ran, e.g. `self.global_step.assign_add(1)` in `train_step`. Training "
    "stops here rather than loop forever."
)


class Controller:
    """Runs the outer loop: train, evaluate, summarise, checkpoint, act.

    `train(steps)` calls `trainer.train(n)` with `n = steps_per_loop` (the inner
    loop) until the global step reaches `steps`, an *absolute* step. After each
    inner loop it calls the train actions with the loop's output, logs the output
    and steps/second, writes summaries (every loop, or when a multiple of
    `summary_interval` is crossed) and saves a checkpoint if
    `checkpoint_manager.checkpoint_interval` steps have passed since the last one.
    `evaluate`, `train_and_evaluate` and `evaluate_continuously` are the other
    entry points.

    If a `checkpoint_manager` is given, the latest checkpoint is restored during
    `__init__` (or the manager's `init_fn` runs), so a restarted job resumes where
    the last complete checkpoint left it. The summary writers the Controller creates
    for it then tell TensorBoard to drop the events a crashed run wrote after that
    checkpoint (`SummaryManager(purge_step=...)`), so a resumed run shows every step
    once.

    Schedule: inner loops end at multiples of an int `steps_per_loop`, evaluations
    (`train_and_evaluate`) at multiples of `eval_interval` and at `train_steps`, and
    summaries are written at multiples of `summary_interval`: all counted from step 0,
    so a run resumed from any checkpoint evaluates, summarises and checkpoints at the
    steps an uninterrupted run does. A checkpoint due at an evaluation step is saved
    after that evaluation, so a resumed run never skips one.

    Stopping: `stop()` (called by an action such as `looproto.actions.EarlyStopping`,
    or by any code holding the Controller) ends training cleanly after the running
    inner loop or evaluation: the final checkpoint is saved and `train()` /
    `train_and_evaluate()` return normally.

    Preemption: while `train()` or `train_and_evaluate()` runs in the main thread,
    SIGTERM and SIGINT (`preemption_signals`) ask for a clean stop. The inner loop
    that is running finishes; then the Controller saves a checkpoint, waits for it,
    closes the summary writers and raises `looproto.preemption.Preempted`, a
    `SystemExit` with status 75. A second signal ends the process at once. See
    `looproto.preemption`.

    Differences from Orbit, each deliberate:

    * `summary_interval` gates the summaries the Controller writes; Orbit wrote
      those every loop and used the interval only for summaries inside the step.
    * A checkpoint manager without `checkpoint_interval` still saves at completion
      and on `save_checkpoint()`; Orbit silently saved nothing.
    * `train(-1)` trains until the data ends; a trainer that does not advance the
      global step stops training with a warning instead of looping forever.
    * Inner loops and evaluations fall on multiples of `steps_per_loop` and
      `eval_interval` counted from step 0; Orbit counts both from the step each
      call starts at, so a resumed run shifts them.

    Example:
        >>> import numpy as np, looproto
        >>> class Counter(looproto.StandardTrainer):
        ...     def __init__(self):
        ...         super().__init__(train_dataset=None)
        ...         self.global_step = looproto.create_global_step()
        ...     def train_step(self, iterator):
        ...         self.global_step.assign_add(1)
        >>> trainer = Counter()
        >>> controller = Controller(
        ...     trainer=trainer, global_step=trainer.global_step, steps_per_loop=4)
        >>> controller.train(steps=10)
        >>> int(trainer.global_step)
        10
    """

    def __init__(
        self,
        *,
        global_step: Any,
        # Things to run.
        trainer: Trainer | None = None,
        evaluator: Evaluator | None = None,
        strategy: Any = None,
        # Actions.
        train_actions: Iterable[Action] | None = None,
        eval_actions: Iterable[Action] | None = None,
        # Train related.
        steps_per_loop: int | Callable[[int], int] | None = None,
        checkpoint_manager: CheckpointManagerLike | None = None,
        # Summary related.
        summary_interval: int | None = None,
        summary_dir: str | None = None,
        eval_summary_dir: str | None = None,
        summary_manager: SummaryManager | None = None,
        eval_summary_manager: SummaryManager | None = None,
        # Preemption.
        preemption_signals: Iterable[int] | None = preemption.DEFAULT_SIGNALS,
        # Divergence.
        check_finite: bool = False,
    ) -> None:
        """Initialises the controller and restores the latest checkpoint.

        Args:
            global_step: The step counter the trainer advances (a variable holding a
                scalar integer). Summaries and checkpoints are indexed by it.
            trainer: A `Trainer`; required for `train`.
            evaluator: An `Evaluator`; required for `evaluate`.
            strategy: An object with a `scope()` context manager (e.g. a
                `tf.distribute.Strategy`) entered around restoring checkpoints.
            train_actions: Callables run after each inner training loop.
            eval_actions: Callables run after each evaluation.
            steps_per_loop: Steps per inner loop: an int, or a callable of the
                current global step. Required with a trainer.
            checkpoint_manager: Saves and restores checkpoints (see `CheckpointManager`).
            summary_interval: Write train summaries when the global step crosses a
                multiple of this; must be a multiple of an int `steps_per_loop`.
                None: after every inner loop.
            summary_dir: Directory for train summaries (none if None).
            eval_summary_dir: Directory for eval summaries; defaults to `summary_dir`
                (then train and eval share one writer, as in Orbit).
            summary_manager: Use this instead of creating one for `summary_dir`.
            eval_summary_manager: Use this instead of creating one for `eval_summary_dir`.
            preemption_signals: Signals that stop training cleanly (save, close,
                raise `Preempted`) while `train()`/`train_and_evaluate()` run; None
                or `()` leaves signals alone (`looproto.preemption.request()` still
                stops training).
            check_finite: After each inner loop, stop with `NonFiniteError` (naming
                the step and the output) if a floating-point train output is NaN or
                infinite, before any summary or checkpoint of that loop is written.

        Raises:
            ConfigError: An argument is invalid; the message says which and why.
            ProtocolError: `trainer`/`evaluator` do not have `train`/`evaluate`.
        """
        check_runners(trainer, evaluator, steps_per_loop, summary_interval)
        check_global_step(global_step)
        self.train_actions: tuple[Action, ...] = check_actions(train_actions, "train_actions")
        self.eval_actions: tuple[Action, ...] = check_actions(eval_actions, "eval_actions")
        check_outputs(
            checkpoint_manager=checkpoint_manager,
            summary_dir=summary_dir,
            eval_summary_dir=eval_summary_dir,
            summary_manager=summary_manager,
            eval_summary_manager=eval_summary_manager,
        )
        self.preemption_signals = preemption.check_signals(preemption_signals)
        if not isinstance(check_finite, bool):
            raise ConfigError(
                f"`check_finite` must be a bool; received check_finite={check_finite!r}."
            )
        self.check_finite = check_finite

        self.trainer = trainer
        self.evaluator = evaluator
        self.strategy = strategy
        self.global_step = global_step
        self.checkpoint_manager = checkpoint_manager
        self.summary_interval = summary_interval
        self._steps_per_loop = steps_per_loop
        self.step_timer: StepTimer | None = None
        self._train_target: int | None = None
        # Why training should end at the next safe point (`stop()`), or None.
        self._stop_reason: str | None = None
        self._entries = 0  # nesting depth of the public entry points running now
        # The step `train_and_evaluate` evaluates at next: its save comes after that.
        self._evaluation_due_at: int | None = None
        self._saved_at: int | None = None  # the step this Controller last saved at

        if checkpoint_manager is not None:
            restored_path = self.restore_checkpoint()
            if restored_path:
                _log.info("restored from checkpoint: %s", restored_path)
        check_step_agrees(global_step, "the start")
        # A training run that can resume rewrites every step after the step it starts
        # from: have TensorBoard drop what a crashed run wrote there (only in the
        # writers created here; an evaluation-only run never purges).
        purge_step = None
        if checkpoint_manager is not None and trainer is not None:
            purge_step = read_int(global_step) + 1
        self.summary_manager = summary_manager or SummaryManager(
            summary_dir if trainer is not None else None,
            global_step=global_step,
            purge_step=purge_step,
        )
        if evaluator is not None:
            eval_summary_dir = eval_summary_dir or summary_dir
            if eval_summary_dir == summary_dir and trainer is not None and not eval_summary_manager:
                self.eval_summary_manager = self.summary_manager
            else:
                self.eval_summary_manager = eval_summary_manager or SummaryManager(
                    eval_summary_dir, global_step=global_step, purge_step=purge_step
                )
        for action in (*self.train_actions, *self.eval_actions):
            bind = getattr(action, "set_controller", None)
            if callable(bind):
                bind(self)

    # ------------------------------------------------------------------ public

    @property
    def steps_per_loop(self) -> int:
        """Steps of the next inner loop (the callable form is evaluated now)."""
        spl = self._steps_per_loop
        if callable(spl):
            value = spl(read_int(self.global_step))
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(
                    f"`steps_per_loop` returned {value!r} at step {read_int(self.global_step)}; "
                    "expected a positive int."
                )
            return int(value)
        assert spl is not None
        return spl

    def train(self, steps: int, checkpoint_at_completion: bool = True) -> None:
        """Trains until the global step reaches `steps` (an absolute step).

        Inner loops end at multiples of an int `steps_per_loop` (the first one may be
        shorter, from a restored step) and at `steps`.

        Args:
            steps: The global step to stop at. `-1` trains until the data ends.
            checkpoint_at_completion: Save a checkpoint at the end, whatever the
                interval says (also when `stop()` ended training early).
        """
        self._require("trainer", for_method="train")
        steps = check_steps(steps, "steps", allow_zero=True)
        with (
            self._entry(),
            preemption.watch(self.preemption_signals),
            self._close_if_preempted(),
        ):
            current_step = read_int(self.global_step)
            target = "the end of the data" if steps == -1 else f"step {steps}"
            _log.info("train | step: %6d | training until %s...", current_step, target)
            self._train_target = None if steps == -1 else steps
            try:
                while (steps == -1 or current_step < steps) and self._stop_reason is None:
                    num_steps = self._next_loop_steps(current_step, steps)
                    new_step = self._train_n_steps(num_steps, current_step)
                    advanced, current_step = new_step - current_step, new_step
                    if current_step != self._evaluation_due_at:
                        # At an evaluation step, `train_and_evaluate` saves (and
                        # stops) after the evaluation.
                        self._maybe_save_checkpoint()
                        self._stop_if_preempted()
                    if advanced < num_steps:
                        _log.info(
                            "train | step: %6d | the data ended after %d of %d steps of "
                            "the last loop.",
                            current_step,
                            advanced,
                            num_steps,
                        )
                        break
                check_step_agrees(self.global_step, "the end of `train()`")
                if checkpoint_at_completion:
                    self._maybe_save_checkpoint(check_interval=False)
            finally:
                self._sync_on_async_checkpointing()
                self.summary_manager.flush()
            # A signal that came during the final save still stops the run.
            if read_int(self.global_step) != self._evaluation_due_at:
                self._stop_if_preempted()

    def evaluate(self, steps: int = -1) -> Output:
        """Runs one evaluation of `steps` steps (`-1`: until the data ends).

        Returns:
            The evaluator's output converted to NumPy, plus `steps_per_second` when
            `steps > 0`; `{}`-based even if the evaluator returned None.
        """
        self._require("evaluator", for_method="evaluate")
        assert self.evaluator is not None
        steps = check_steps(steps, "steps", allow_zero=False)
        steps_msg = (
            f"running {steps} steps of evaluation..."
            if steps > 0
            else ("running complete evaluation...")
        )
        current_step = read_int(self.global_step)
        _log.info(" eval | step: %6d | %s", current_step, steps_msg)

        _recording.clear()  # what steps recorded before belongs to no evaluation
        start = time.perf_counter()
        raw_output = self._run_evaluator(steps)
        _nest.check_output(raw_output, "evaluator.evaluate")
        elapsed = time.perf_counter() - start
        raw_output = raw_output or {}
        for action in self.eval_actions:
            action(raw_output)
        output: dict[str, Any] = dict(_nest.map_output(_nest.to_numpy_leaf, raw_output))
        if steps > 0:
            output["steps_per_second"] = steps / max(elapsed, 1e-12)
        _log.info(
            " eval | step: %6d | eval time: %6.1f sec | output: %s",
            current_step,
            elapsed,
            Formatted(output),
        )
        self.eval_summary_manager.write_summaries(_with_recorded(output, "evaluator.evaluate"))
        self.eval_summary_manager.flush()
        return output

    def train_and_evaluate(
        self, train_steps: int, eval_steps: int = -1, eval_interval: int | None = None
    ) -> Output | None:
        """Alternates training and evaluation until `train_steps` (absolute).

        Evaluates at every multiple of `eval_interval` (counted from step 0, so a
        resumed run evaluates at the same steps as an uninterrupted one) and at
        `train_steps`; inner loops are cut short to end there. Without
        `eval_interval`, trains to `train_steps` and evaluates once. A checkpoint due
        at an evaluation step is saved after the evaluation; with a manager that keeps
        the best checkpoints (`CheckpointManager(best_fn=...)`) every evaluated step is
        saved, with the evaluation's output as its metrics.
        `train_steps=-1` trains until the data ends (evaluating at each multiple of
        `eval_interval` and at the end).

        Returns:
            The output of the last evaluation, or None if there was none (nothing to
            train, or `stop()` before the first evaluation).
        """
        self._require("trainer", for_method="train_and_evaluate")
        self._require("evaluator", for_method="train_and_evaluate")
        train_steps = check_steps(train_steps, "train_steps", allow_zero=True)
        # Checked now, not at the first evaluation: after a whole stretch of training,
        # or never when there is nothing to train.
        eval_steps = check_steps(eval_steps, "eval_steps", allow_zero=False)
        if eval_interval is not None:
            eval_interval = check_steps(
                eval_interval, "eval_interval", allow_zero=False, allow_all=False
            )
        current_step = read_int(self.global_step)
        output = None
        with (
            self._entry(),
            preemption.watch(self.preemption_signals),
            self._close_if_preempted(),
        ):
            try:
                while (
                    train_steps == -1 or current_step < train_steps
                ) and self._stop_reason is None:
                    target = train_steps  # -1: until the data ends
                    if eval_interval is not None:
                        target = (current_step // eval_interval + 1) * eval_interval
                        if train_steps != -1:
                            target = min(train_steps, target)
                    self._evaluation_due_at = target
                    try:
                        self.train(steps=target, checkpoint_at_completion=False)
                    finally:
                        self._evaluation_due_at = None
                    if self._stop_reason is not None:
                        break  # a train action stopped training: no more evaluation
                    output = self.evaluate(steps=eval_steps)
                    self._save_after_evaluation(output)
                    self._stop_if_preempted()  # a signal during the evaluation
                    reached = read_int(self.global_step)
                    if target == -1 or reached < target:  # the training data ended
                        break
                    current_step = reached
                self._maybe_save_checkpoint(check_interval=False)
            finally:
                self._sync_on_async_checkpointing()
            self._stop_if_preempted()
        return output

    def evaluate_continuously(
        self,
        steps: int = -1,
        timeout: float | None = None,
        timeout_fn: Callable[[], bool] | None = None,
    ) -> Output | None:
        """Evaluates every new checkpoint that appears in the checkpoint directory.

        Args:
            steps: Steps per evaluation (`-1`: until the data ends).
            timeout: Seconds to wait for a new checkpoint before giving up (None:
                wait forever).
            timeout_fn: Called on timeout; stop if it returns True, else keep waiting.

        Returns:
            The output of the last evaluation, or None if there was none.
        """
        self._require("evaluator", for_method="evaluate_continuously")
        self._require("checkpoint_manager", for_method="evaluate_continuously")
        assert self.checkpoint_manager is not None
        from looproto.checkpoint import checkpoints_iterator

        output = None
        with self._entry():
            for checkpoint_path in checkpoints_iterator(
                self.checkpoint_manager.directory, timeout=timeout, timeout_fn=timeout_fn
            ):
                try:
                    self.restore_checkpoint(checkpoint_path)
                except CheckpointError:
                    if os.path.isdir(checkpoint_path):
                        raise
                    # The trainer's retention deleted it before or while it was read:
                    # the newer checkpoint that replaced it comes next.
                    _log.info(
                        "skipped %s: deleted by its owner before it was read.", checkpoint_path
                    )
                    continue
                output = self.evaluate(steps)
                if self._stop_reason is not None:  # an eval action asked to stop
                    break
        return output

    def restore_checkpoint(self, checkpoint_path: str | None = None) -> str | None:
        """Restores `checkpoint_path`, or the latest checkpoint (or initialises).

        With a trainer, and a manager that numbers checkpoints by a `step_counter`,
        restoring checkpoint N must set that counter to N: anything else means the
        global step is not in the checkpoint, and training would silently go on from
        the wrong step.

        Returns:
            The path restored from, or None if there was no checkpoint.

        Raises:
            CheckpointError: The step counter does not read the restored checkpoint's
                number (the message says how to checkpoint it).
        """
        self._require("checkpoint_manager", for_method="restore_checkpoint")
        assert self.checkpoint_manager is not None
        scope = self.strategy.scope() if hasattr(self.strategy, "scope") else _null()
        with scope:
            if checkpoint_path is not None:
                _log.info("restoring model from %s...", checkpoint_path)
                self.checkpoint_manager.restore(checkpoint_path)
            else:
                _log.info("restoring or initializing model...")
                checkpoint_path = self.checkpoint_manager.restore_or_initialize()
        if checkpoint_path is not None:
            _log.info("restored model from %s.", checkpoint_path)
            if self.trainer is not None:
                check_restored_step(self.checkpoint_manager, checkpoint_path)
        return checkpoint_path

    def save_checkpoint(self) -> None:
        """Saves a checkpoint at the current global step now (and waits for it)."""
        self._require("checkpoint_manager", for_method="save_checkpoint")
        self._maybe_save_checkpoint(check_interval=False)
        self._sync_on_async_checkpointing()

    def stop(self, reason: str = "`Controller.stop()` was called") -> None:
        """Ends training cleanly at the next safe point, as if it had completed.

        The running inner loop (or evaluation) finishes; then `train()` and
        `train_and_evaluate()` skip what is left, save the final checkpoint and return
        normally (`looproto train` exits with status 0). `evaluate_continuously()`
        stops after the evaluation that is running. A stop requested while nothing
        runs ends the next call at its start. Unlike a preemption, it means "done":
        the run is not meant to be resumed.

        Args:
            reason: Why, for the log (e.g. "no improvement of eval_loss in 3
                evaluations").
        """
        if not isinstance(reason, str):
            raise ConfigError(f"`reason` must be a str; received reason={reason!r}.")
        if self._stop_reason is None:
            _log.info("stop | step: %6d | %s", read_int(self.global_step), reason)
            self._stop_reason = reason

    @property
    def stop_reason(self) -> str | None:
        """Why `stop()` ended (or will end) the running call; None when it was not called."""
        return self._stop_reason

    # -------------------------------------------------------------- preemption

    def _stop_if_preempted(self) -> None:
        """If a stop was requested: save, wait for the save, close, raise `Preempted`."""
        if not preemption.requested():
            return
        signal_number = preemption.signal_received()
        step = read_int(self.global_step)
        cause = "a preemption request" if signal_number is None else signal_number.name
        _log.warning(
            "train | step: %6d | %s received: saving a checkpoint and stopping.", step, cause
        )
        checkpoint = None
        manager = self.checkpoint_manager
        if manager is not None:
            checkpoint = self._maybe_save_checkpoint(check_interval=False)
            manager.sync()  # the process may exit right after: the save must be on disk
            latest = manager.latest_checkpoint
            if checkpoint is None and latest is not None and checkpoint_number(latest) == step:
                checkpoint = latest  # saved at this step already (interval or completion)
        preemption.acknowledge()  # a signal while closing down still exits at once
        raise preemption.Preempted(step, signal_number, checkpoint)

    @contextlib.contextmanager
    def _close_if_preempted(self) -> Iterator[None]:
        """Closes the summary writers when `Preempted` (from here or an action) passes."""
        try:
            yield
        except preemption.Preempted:
            # Not `close()`: the checkpoint manager stays open, so that a program that
            # catches `Preempted` may go on training.
            self._sync_on_async_checkpointing()
            self._close_summaries()
            raise

    # ----------------------------------------------------------------- private

    @contextlib.contextmanager
    def _entry(self) -> Iterator[None]:
        """Marks a public entry point; the outermost one ends a `stop()` it honoured."""
        self._entries += 1
        try:
            yield
        finally:
            self._entries -= 1
            if self._entries == 0 and self._stop_reason is not None:
                _log.info(
                    "stop | step: %6d | training stopped: %s",
                    read_int(self.global_step),
                    self._stop_reason,
                )
                self._stop_reason = None

    def _next_loop_steps(self, current_step: int, steps: int) -> int:
        """Steps of the next inner loop: to the next multiple of an int `steps_per_loop`."""
        spl = self._steps_per_loop
        if callable(spl):
            loop_steps = self.steps_per_loop
        else:
            assert spl is not None
            loop_steps = spl - current_step % spl
        return loop_steps if steps == -1 else min(steps - current_step, loop_steps)

    def _train_n_steps(self, num_steps: int, current_step: int) -> int:
        """Runs one inner loop from `current_step`; returns the global step after it."""
        assert self.trainer is not None
        if self.step_timer is None:
            self.step_timer = StepTimer(self.global_step)
        _recording.clear()  # what steps recorded before belongs to no loop
        # Time the inner loop alone: checkpoints and summaries are not training speed.
        self.step_timer.start(current_step)
        raw_output = self._run_trainer(num_steps)
        _nest.check_output(raw_output, "trainer.train")
        new_step = read_int(self.global_step)
        steps_per_second = self.step_timer.steps_per_second(current_step=new_step)
        advanced = new_step - current_step
        if advanced == 0 and num_steps != 0:
            _log.warning(MSG_STEP_NOT_ADVANCED.format(num_steps=num_steps, step=current_step))
        elif advanced != num_steps and num_steps != -1:
            _log.info(
                "`trainer.train(%d)` advanced `global_step` by %d (from %d to %d).",
                num_steps,
                advanced,
                current_step,
                new_step,
            )
        raw_output = raw_output or {}
        for action in self.train_actions:
            action(raw_output)
        output: dict[str, Any] = dict(_nest.map_output(_nest.to_numpy_leaf, raw_output))
        if self.check_finite:
            self._refuse_non_finite(output, current_step, new_step)
        target = self._train_target
        _log.info(
            "train | step: %6d | steps/sec: %6.1f | ETA %s | output: %s",
            new_step,
            steps_per_second,
            eta(target - new_step if target is not None else None, steps_per_second),
            Formatted(output),
        )
        recorded = _recording.take()  # in-step summaries, and the train actions' own
        if self._summary_due(current_step, new_step):
            output["steps_per_second"] = steps_per_second
            if recorded:
                output.update(_check_recorded(recorded, output, "trainer.train"))
            self.summary_manager.write_summaries(output, step=new_step)
            self.summary_manager.flush()
        if self.train_actions:
            # An action may move the step (a restore, say): the loop goes on from there.
            new_step = read_int(self.global_step)
        return new_step

    def _refuse_non_finite(self, output: Output, old_step: int, new_step: int) -> None:
        """Raises `NonFiniteError` if a floating-point output leaf is NaN or infinite."""
        for path, leaf in _nest.flatten_with_paths(output):
            value = np.asarray(leaf)
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                manager = self.checkpoint_manager
                newest = manager.latest_checkpoint if manager is not None else None
                kept = (
                    f"the newest checkpoint, {newest}, is kept"
                    if newest
                    else "no checkpoint was saved"
                )
                shown = (
                    repr(value.item())
                    if value.size == 1
                    else f"an array with {value.size - np.isfinite(value).sum()} NaN or "
                    "infinite value(s)"
                )
                raise NonFiniteError(
                    f"Training diverged: train output {_nest.path_to_str(path)!r} is "
                    f"{shown} after steps {old_step + 1}-{new_step} (global step "
                    f"{new_step}). Stopped before writing its summaries or a checkpoint; "
                    f"{kept}."
                )

    def _run_trainer(self, num_steps: int) -> Output | None:
        """One inner loop: `trainer.train(num_steps)` (a subclass may wrap the call)."""
        assert self.trainer is not None
        return self.trainer.train(num_steps)

    def _run_evaluator(self, steps: int) -> Output | None:
        """One evaluation: `evaluator.evaluate(steps)` (a subclass may wrap the call)."""
        assert self.evaluator is not None
        return self.evaluator.evaluate(steps)

    def _summary_due(self, old_step: int, new_step: int) -> bool:
        interval = self.summary_interval
        if interval is None:
            return new_step != old_step
        return math.floor(new_step / interval) > math.floor(old_step / interval)

    def _save_after_evaluation(self, output: Output) -> None:
        """The save due at an evaluation step; every evaluated step when keeping the best."""
        manager = self.checkpoint_manager
        if manager is not None and getattr(manager, "best_fn", None) is not None:
            self._maybe_save_checkpoint(check_interval=False, metrics=output)
        else:
            self._maybe_save_checkpoint()

    def _maybe_save_checkpoint(
        self, check_interval: bool = True, metrics: Output | None = None
    ) -> str | None:
        """Saves if due; returns the new checkpoint's path, or None if none was saved.

        `metrics` (an evaluation's output) go with the checkpoint to a manager that
        keeps the best ones.
        """
        manager = self.checkpoint_manager
        if manager is None:
            return None
        if check_interval and not manager.checkpoint_interval:
            return None
        step = read_int(self.global_step)
        if step == self._saved_at and step == _latest_step(manager):
            return None  # saved at this step already (after its evaluation, say)
        if metrics is not None:
            path = manager.save(  # type: ignore[call-arg]
                checkpoint_number=step, check_interval=check_interval, metrics=metrics
            )
        else:
            path = manager.save(checkpoint_number=step, check_interval=check_interval)
        if path is not None:
            self._saved_at = step
            _log.info("saved checkpoint to %s.", path)
            # The summaries of the steps this checkpoint covers outlive a crash with it.
            self.summary_manager.sync()
            eval_manager = getattr(self, "eval_summary_manager", None)
            if eval_manager is not None:
                eval_manager.sync()
            return str(path)
        return None

    def _sync_on_async_checkpointing(self) -> None:
        if self.checkpoint_manager is not None:
            self.checkpoint_manager.sync()

    def _require(self, attribute: str, for_method: str) -> None:
        if getattr(self, attribute, None) is None:
            raise ConfigError(
                f"`{attribute}` is not set. Pass `{attribute}` to `Controller.__init__` "
                f"before calling `{for_method}()`."
            )

    def close(self) -> None:
        """Waits for pending checkpoints, then closes the checkpoint manager and summaries.

        Closing the checkpoint manager (when it has a `close()`) releases its
        directory: another process may write it from then on.
        """
        self._sync_on_async_checkpointing()
        close_checkpoints = getattr(self.checkpoint_manager, "close", None)
        if callable(close_checkpoints):
            close_checkpoints()
        self._close_summaries()

    def _close_summaries(self) -> None:
        self.summary_manager.close()
        eval_manager = getattr(self, "eval_summary_manager", None)
        if eval_manager is not None:
            eval_manager.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _null() -> Any:
    return contextlib.nullcontext()


def _latest_step(manager: CheckpointManagerLike) -> int | None:
    latest = manager.latest_checkpoint
    return None if latest is None else checkpoint_number(latest)


def _check_recorded(recorded: Mapping[str, Any], output: Output, where: str) -> Mapping[str, Any]:
    """In-step summaries, checked not to shadow a key of the loop's output."""
    clashes = sorted(name for name in recorded if name in output)
    if clashes:
        raise ProtocolError(
            f"The summaries recorded with `looproto.summary.scalar/histogram` {clashes} have "
            f"the names of keys `{where}` returned; rename one of them."
        )
    return recorded


def _with_recorded(output: dict[str, Any], where: str) -> dict[str, Any]:
    """`output` plus what the evaluation's steps and the eval actions recorded."""
    recorded = _recording.take()
    if not recorded:
        return output
    return {**output, **_check_recorded(recorded, output, where)}
