"""The researcher's outer loop, read back as a user sees it: event files, checkpoints, exit codes.

Early stopping ends a run cleanly (status 0, final checkpoint, and it stays stopped);
keep-best checkpoint managers keep the best by the metric plus the newest; a run
preempted three times evaluates at the very steps, with the very values, of an
uninterrupted one; in-step summaries land in the event files at multiples of
`summary_interval`; `enable_logging` prints the Controller's lines.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import preemption
from looproto.actions import EarlyStopping
from looproto.checkpoint import CheckpointManager, latest_step
from looproto.preemption import Preempted
from tests.helpers import TestRunner, scalars, tensorboard_scalars


@pytest.fixture(autouse=True)
def _no_pending_preemption() -> Any:
    preemption.clear()
    yield
    preemption.clear()


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# ----------------------------------------------------------------------------
# Early stopping


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    early = EarlyStopping("eval/accuracy", mode="max", patience=2, min_delta=0.01)
    for accuracy in [0.5, 0.6, 0.605, 0.7, 0.705]:  # +0.005 is within min_delta
        early({"eval": {"accuracy": accuracy}})
    assert (early.should_stop, early.best_value, early.wait) == (False, 0.7, 1)
    early({"eval": {"accuracy": 0.69}})
    assert early.should_stop and early.wait == 2
    assert "eval/accuracy has not improved on the best, 0.7" in early.reason

    baseline = EarlyStopping("loss", patience=2, baseline=1.0)
    baseline({"loss": 1.5})
    assert baseline.best_value is None and baseline.wait == 1
    baseline({"loss": 0.9})
    assert baseline.best_value == 0.9 and baseline.wait == 0

    nan = EarlyStopping("loss", patience=100)
    nan({"loss": 1.0})
    nan({"loss": float("nan")})
    assert nan.should_stop and nan.reason == "loss is nan at step 1"


def test_early_stopping_rejects_bad_arguments_by_name() -> None:
    with pytest.raises(looproto.ConfigError, match=r"`mode` must be 'min' or 'max'; received"):
        EarlyStopping("loss", mode="lower")
    with pytest.raises(looproto.ConfigError, match=r"`patience`"):
        EarlyStopping("loss", patience=0)
    with pytest.raises(looproto.ConfigError, match=r"`min_delta` must be a number >= 0"):
        EarlyStopping("loss", min_delta=-1)
    with pytest.raises(looproto.ConfigError, match=r"`metric` 'loss' is not in the output"):
        EarlyStopping("loss")({"eval_loss": 1.0})


def _run(tmp_path: Path, early: EarlyStopping, **manager: Any) -> tuple[TestRunner, Any]:
    runner = TestRunner()
    checkpoints = CheckpointManager(
        tmp_path / "ckpt", runner, step_counter=runner.global_step, **manager
    )
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=checkpoints,
        summary_dir=tmp_path / "summaries",
        eval_actions=[early],
        preemption_signals=None,
    )
    return runner, controller


def test_early_stopping_ends_training_with_a_final_checkpoint_and_stays_stopped(
    tmp_path: Path,
) -> None:
    history = str(tmp_path / "early.json")
    # Nothing improves by 100: the first evaluation is the best, two more stop it.
    early = EarlyStopping("eval_loss", patience=2, min_delta=100.0, filename=history)
    runner, controller = _run(tmp_path, early, checkpoint_interval=100, max_to_keep=None)
    with controller:
        output = controller.train_and_evaluate(train_steps=60, eval_steps=2, eval_interval=4)
    assert int(runner.global_step) == 12 and output is not None
    assert early.should_stop and controller.stop_reason is None  # honoured, then cleared
    assert latest_step(tmp_path / "ckpt") == 12  # the final checkpoint
    assert [s for s, _ in scalars(tmp_path / "summaries")["eval_loss"]] == [4, 8, 12]

    # Run again (a job restarted): it stays stopped, before any training.
    early = EarlyStopping("eval_loss", patience=2, min_delta=100.0, filename=history)
    runner, controller = _run(tmp_path, early, checkpoint_interval=100, max_to_keep=None)
    with controller:
        assert controller.train_and_evaluate(60, eval_steps=2, eval_interval=4) is None
    assert int(runner.global_step) == 12 and runner.train_calls == []


def test_stop_from_a_train_action_ends_train_with_its_completion_checkpoint(
    tmp_path: Path,
) -> None:
    runner = TestRunner()
    checkpoints = CheckpointManager(tmp_path, runner, step_counter=runner.global_step)
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=3,
        checkpoint_manager=checkpoints,
        preemption_signals=None,
    )

    def stop_at_loss(output: Any) -> None:
        if int(runner.global_step) >= 7:
            controller.stop("loss is low enough")

    controller.train_actions = (stop_at_loss,)
    controller.train(100)
    assert int(runner.global_step) == 9
    assert steps_on_disk(tmp_path) == [9]
    assert controller.stop_reason is None
    controller.train(12)  # a later call trains again
    assert int(runner.global_step) == 12


def test_an_early_stopped_cli_run_exits_0_with_its_final_checkpoint(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            backend = "numpy"
            model_dir = "{tmp_path / "run"}"

            [trainer]
            factory = "looproto.examples.mlp:trainer"

            [evaluator]
            factory = "looproto.examples.mlp:evaluator"

            [train]
            steps = 100000
            steps_per_loop = 5
            eval_interval = 10

            [checkpoint]
            interval = 1000

            [early_stopping]
            metric = "eval_loss"
            patience = 2
            min_delta = 100.0
            """
        )
    )

    def train() -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("LOOPROTO_BACKEND", None)
        return subprocess.run(
            [sys.executable, "-m", "looproto", "train", str(config), "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip

    result = train()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained to step 30" in result.stdout
    assert "stopped early: eval_loss has not improved" in result.stdout
    assert latest_step(tmp_path / "run" / "checkpoints") == 30
    again = train()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained to step 30" in again.stdout
    assert latest_step(tmp_path / "run" / "checkpoints") == 30


# ----------------------------------------------------------------------------
# Keep-best checkpoints


def test_kept_checkpoints_are_the_k_best_by_the_metric_plus_the_latest(tmp_path: Path) -> None:
    class Noisy(TestRunner):
        """Evaluates to a loss that goes up and down (a fixed pattern by step)."""

        __test__ = False

        def eval_end(self, *args: Any) -> dict[str, Any]:
            step = int(self.global_step)
            return {"eval_loss": np.float32((step * 7919) % 13 + 0.5)}

    runner = Noisy()
    checkpoints = CheckpointManager(
        tmp_path / "ckpt",
        runner,
        step_counter=runner.global_step,
        max_to_keep=1,
        best_fn="eval_loss",
        best_mode="min",
        keep_best=3,
    )
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=checkpoints,
        eval_summary_dir=tmp_path / "eval",
        preemption_signals=None,
    )
    with controller:
        controller.train_and_evaluate(train_steps=40, eval_steps=1, eval_interval=4)
    # What TensorBoard shows of every evaluation...
    evaluations = scalars(tmp_path / "eval")["eval_loss"]
    assert [s for s, _ in evaluations] == list(range(4, 41, 4))
    best = sorted(evaluations, key=lambda pair: (pair[1], -pair[0]))[:3]
    # ...decides what is on disk: the 3 best and the newest.
    assert steps_on_disk(tmp_path / "ckpt") == sorted({40, *(s for s, _ in best)})
    assert checkpoints.best_checkpoint == str(tmp_path / "ckpt" / str(best[0][0]))

    # A new manager (a restarted run) ranks the checkpoints on disk by their saved metrics.
    again = CheckpointManager(
        tmp_path / "ckpt", runner, best_fn=lambda m: m["eval_loss"], best_mode="min", keep_best=3
    )
    assert again.best_checkpoint == checkpoints.best_checkpoint


def test_a_damaged_best_checkpoint_is_not_kept_in_place_of_a_good_one(tmp_path: Path) -> None:
    w = looproto.Variable(np.zeros(3, np.float32), name="w")
    manager = CheckpointManager(
        tmp_path, {"w": w}, max_to_keep=1, best_fn="loss", best_mode="min", keep_best=1
    )
    manager.save(1, metrics={"loss": 0.1})
    manager.save(2, metrics={"loss": 0.5})
    # The best one's array index goes missing: it no longer counts.
    os.remove(tmp_path / "1" / "state" / "_METADATA")
    manager._verified.clear()
    manager.save(3, metrics={"loss": 0.9})
    assert steps_on_disk(tmp_path) == [2, 3]  # 2 is the best good one; 1 is gone
    assert manager.best_checkpoint == str(tmp_path / "2")


def test_keep_best_arguments_are_checked() -> None:
    w = looproto.Variable(np.zeros(1, np.float32))
    with pytest.raises(looproto.ConfigError, match=r"`keep_best` is 2 but `best_fn` is None"):
        CheckpointManager("/tmp/x", w, keep_best=2)
    with pytest.raises(looproto.ConfigError, match=r"`best_mode` must be 'max' or 'min'"):
        CheckpointManager("/tmp/x", w, best_fn="loss", best_mode="lowest")


def test_a_metric_the_outputs_lack_fails_at_the_save(tmp_path: Path) -> None:
    w = looproto.Variable(np.zeros(1, np.float32))
    manager = CheckpointManager(tmp_path, w, best_fn="accuracy")
    with pytest.raises(looproto.ConfigError, match=r"'accuracy' is not in the metrics.*loss"):
        manager.save(1, metrics={"loss": 1.0})


# ----------------------------------------------------------------------------
# The evaluation schedule across preemptions


class Preempting(TestRunner):
    """Asks to be preempted at some global steps, in training or in the evaluation."""

    __test__ = False

    def __init__(self, train_at: set[int], eval_at: set[int]) -> None:
        super().__init__()
        self.train_at, self.eval_at = train_at, eval_at

    def train_step(self, iterator: Any) -> None:
        super().train_step(iterator)
        if int(self.global_step) in self.train_at:
            preemption.request()

    def eval_step(self, iterator: Any) -> None:
        super().eval_step(iterator)
        if int(self.global_step) in self.eval_at:
            preemption.request()


def _schedule_run(model_dir: Path, runner: TestRunner) -> None:
    checkpoints = CheckpointManager(
        model_dir / "ckpt",
        runner,
        step_counter=runner.global_step,
        checkpoint_interval=4,
        max_to_keep=None,
    )
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=checkpoints,
        summary_dir=model_dir / "train",
        eval_summary_dir=model_dir / "eval",
        preemption_signals=None,
    )
    with controller:
        controller.train_and_evaluate(train_steps=30, eval_steps=3, eval_interval=6)


def test_a_run_preempted_three_times_evaluates_as_an_uninterrupted_one(tmp_path: Path) -> None:
    _schedule_run(tmp_path / "reference", TestRunner())
    # Stops requested in a loop that ends at an evaluation step (6), in one that
    # does not (13 -> 14), and during an evaluation (18).
    stops = 0
    while True:
        runner = Preempting(train_at={5, 13}, eval_at={18})
        try:
            _schedule_run(tmp_path / "preempted", runner)
            break
        except Preempted:
            stops += 1
    assert stops == 3
    for run in ("eval", "train"):
        reference = tensorboard_scalars(tmp_path / "reference" / run)
        resumed = tensorboard_scalars(tmp_path / "preempted" / run)
        key = "eval_loss" if run == "eval" else "loss"
        assert resumed[key] == reference[key], run
    evaluated = [s for s, _ in tensorboard_scalars(tmp_path / "reference" / "eval")["eval_loss"]]
    assert evaluated == [6, 12, 18, 24, 30]


def test_inner_loops_end_at_multiples_of_steps_per_loop_after_a_resume(tmp_path: Path) -> None:
    runner = TestRunner()
    runner.global_step.assign(3)
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=4,
        summary_dir=tmp_path,
        summary_interval=8,
        preemption_signals=None,
    )
    controller.train(20)
    assert runner.train_calls == [3, 4, 8, 12, 16]
    assert [s for s, _ in scalars(tmp_path)["loss"]] == [8, 16]


# ----------------------------------------------------------------------------
# Logging


def test_enable_logging_prints_the_controllers_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("looproto")
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    stream = io.StringIO()
    looproto.enable_logging(stream=stream)
    looproto.enable_logging(stream=stream)  # a second call does not print twice
    runner = TestRunner()
    looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=2, preemption_signals=None
    ).train(4)
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "steps/sec" in line][-1].startswith("train | step:      4")
    assert len([line for line in lines if "training until step 4" in line]) == 1
    with pytest.raises(looproto.ConfigError, match=r"`level` must be a logging level"):
        looproto.enable_logging("LOUD")
