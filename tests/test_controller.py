"""The Controller: a port of the behaviours Orbit's `controller_test.py` checks, plus looproto's.

Summaries are read back from the event files and checkpoints from disk, as a user
(or TensorBoard) would see them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pytest

import looproto
from looproto.checkpoint import CheckpointManager
from tests.helpers import (
    TestEvaluator,
    TestEvaluatorNoOutput,
    TestEvaluatorWithNestedSummary,
    TestRunner,
    scalars,
)


def steps_on_disk(directory: Any) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def manager(directory: Any, runner: TestRunner, **kwargs: Any) -> CheckpointManager:
    kwargs.setdefault("max_to_keep", None)
    return CheckpointManager(directory, runner, step_counter=runner.global_step, **kwargs)


# --------------------------------------------------------------- train / evaluate


def test_train_and_evaluate_alternates_and_writes_both_summary_dirs(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        summary_dir=tmp_path / "summaries/train",
        eval_summary_dir=tmp_path / "summaries/eval",
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert int(runner.global_step) == 10
    # Inner loops end at 2, 4, 6 (then evaluate), 8, 10 (then evaluate).
    assert runner.train_calls == [0, 2, 4, 6, 8]
    train = scalars(tmp_path / "summaries/train")
    assert [step for step, _ in train["loss"]] == [2, 4, 6, 8, 10]
    assert [step for step, _ in train["steps_per_second"]] == [2, 4, 6, 8, 10]
    assert train["loss"][-1][1] < train["loss"][0][1]  # it learns
    evals = scalars(tmp_path / "summaries/eval")
    assert [step for step, _ in evals["eval_loss"]] == [6, 10]
    assert [step for step, _ in evals["steps_per_second"]] == [6, 10]

    # The controller re-reads the step on every call: no cached state.
    runner.global_step.assign(0)
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert int(runner.global_step) == 10


def test_runs_without_checkpoints_or_summaries(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner, evaluator=runner, global_step=runner.global_step, steps_per_loop=2
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert int(runner.global_step) == 10
    assert os.listdir(tmp_path) == []


def test_eval_summary_only_writes_no_train_summaries(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=manager(tmp_path / "ckpt", runner),
        eval_summary_dir=tmp_path / "summaries/eval",
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert sorted(os.listdir(tmp_path / "summaries")) == ["eval"]
    assert "eval_loss" in scalars(tmp_path / "summaries/eval")


def test_train_only_does_not_create_eval_summary_dir(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=manager(tmp_path / "ckpt", runner, checkpoint_interval=10),
        summary_dir=tmp_path / "summaries/train",
        eval_summary_dir=tmp_path / "summaries/eval",
    )
    controller.train(steps=10)
    assert steps_on_disk(tmp_path / "ckpt") == [2, 10]  # first save, then the completion one
    assert "loss" in scalars(tmp_path / "summaries/train")
    assert not (tmp_path / "summaries/eval").exists()


def test_evaluate_only_restores_and_writes_eval_summaries(tmp_path):
    runner = TestRunner()
    trained = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=5,
        checkpoint_manager=manager(tmp_path / "ckpt", runner),
    )
    trained.train(steps=5)
    saved_w = runner.w.numpy()

    fresh = TestRunner()
    controller = looproto.Controller(
        evaluator=fresh,
        global_step=fresh.global_step,
        checkpoint_manager=manager(tmp_path / "ckpt", fresh),
        summary_dir=tmp_path / "summaries/train",
        eval_summary_dir=tmp_path / "summaries/eval",
    )
    assert int(fresh.global_step) == 5  # restored during __init__
    np.testing.assert_array_equal(fresh.w.numpy(), saved_w)
    output = controller.evaluate(steps=2)
    assert "eval_loss" in output
    assert not (tmp_path / "summaries/train").exists()
    assert [s for s, _ in scalars(tmp_path / "summaries/eval")["eval_loss"]] == [5]


def test_evaluate_complete_runs_until_data_ends(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(evaluator=runner, global_step=runner.global_step)
    output = controller.evaluate()  # steps=-1
    assert runner.eval_count == 100  # the whole dataset: 100 batches
    assert "steps_per_second" not in output  # only added for steps > 0


def test_evaluate_with_no_output_returns_steps_per_second_only(tmp_path):
    step = looproto.create_global_step()
    controller = looproto.Controller(
        evaluator=TestEvaluatorNoOutput(), global_step=step, eval_summary_dir=tmp_path
    )
    assert set(controller.evaluate(steps=5)) == {"steps_per_second"}


def test_evaluate_with_reduce_state(tmp_path):
    evaluator = TestEvaluator()
    step = looproto.create_global_step()
    controller = looproto.Controller(
        evaluator=evaluator, global_step=step, eval_summary_dir=tmp_path / "eval"
    )
    output = controller.evaluate(steps=5)
    assert output["eval_loss"] > 0
    assert "eval_loss" in scalars(tmp_path / "eval")


def test_nested_output_writes_nested_summary_dirs(tmp_path):
    step = looproto.create_global_step()
    controller = looproto.Controller(
        evaluator=TestEvaluatorWithNestedSummary(), global_step=step, eval_summary_dir=tmp_path
    )
    controller.evaluate(steps=5)
    for run in ("dataset", "dataset2"):
        tags = scalars(tmp_path, run)
        assert tags["loss"] == [(0, 5.0)]
        assert set(tags) == {"loss", "accuracy"}
    assert set(scalars(tmp_path)) == {"steps_per_second"}


def test_same_summary_dir_shares_one_writer(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        summary_dir=tmp_path,
        eval_summary_dir=tmp_path,
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert controller.eval_summary_manager is controller.summary_manager
    events = [name for name in os.listdir(tmp_path) if name.startswith("events")]
    assert len(events) == 1
    tags = scalars(tmp_path)
    assert {"loss", "eval_loss"} <= set(tags)


# ------------------------------------------------------------------- checkpoints


def test_checkpoints_at_interval_and_restore_latest(tmp_path):
    runner = TestRunner()
    ckpt = manager(tmp_path, runner, checkpoint_interval=5)
    controller = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=5, checkpoint_manager=ckpt
    )
    controller.train(steps=20)
    assert steps_on_disk(tmp_path) == [5, 10, 15, 20]  # the completion save at 20 is a duplicate
    assert len(ckpt.checkpoints) == 4
    assert controller.restore_checkpoint() == ckpt.checkpoints[-1]


def test_eval_interval_truncates_inner_loops_and_checkpoints(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=10,
        checkpoint_manager=manager(tmp_path / "ckpt", runner, checkpoint_interval=5),
        summary_dir=tmp_path / "summaries",
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=5)
    assert runner.train_calls == [0, 5]
    assert steps_on_disk(tmp_path / "ckpt") == [5, 10]
    assert [s for s, _ in scalars(tmp_path / "summaries")["eval_loss"]] == [5, 10]


def test_checkpoint_interval_with_steps_per_loop(tmp_path):
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=3,
        checkpoint_manager=manager(tmp_path, runner, checkpoint_interval=7),
    )
    controller.train(steps=20)
    # Loops end at 3, 6, ..., 18, 20; a save needs 7 steps since the last one.
    assert steps_on_disk(tmp_path) == [3, 12, 20]


def test_already_trained_model_still_saves_at_completion(tmp_path):
    runner = TestRunner()
    runner.global_step.assign(10)
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        checkpoint_manager=manager(tmp_path, runner, checkpoint_interval=10),
    )
    controller.train(steps=10)
    assert runner.train_calls == []
    assert steps_on_disk(tmp_path) == [10]


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path):
    straight = TestRunner()
    looproto.Controller(trainer=straight, global_step=straight.global_step, steps_per_loop=4).train(
        steps=24
    )

    first = TestRunner()
    looproto.Controller(
        trainer=first,
        global_step=first.global_step,
        steps_per_loop=4,
        checkpoint_manager=manager(tmp_path, first, checkpoint_interval=4),
    ).train(steps=12)

    resumed = TestRunner()  # a new process would build the same objects
    controller = looproto.Controller(
        trainer=resumed,
        global_step=resumed.global_step,
        steps_per_loop=4,
        checkpoint_manager=manager(tmp_path, resumed, checkpoint_interval=4),
    )
    assert int(resumed.global_step) == 12
    controller.train(steps=24)
    np.testing.assert_array_equal(resumed.w.numpy(), straight.w.numpy())
    np.testing.assert_array_equal(resumed.b.numpy(), straight.b.numpy())


def test_evaluate_continuously_evaluates_each_checkpoint_then_times_out(tmp_path):
    runner = TestRunner()
    looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=5,
        checkpoint_manager=manager(tmp_path / "ckpt", runner),
    ).train(steps=5)

    evaluator = TestRunner()
    controller = looproto.Controller(
        evaluator=evaluator,
        global_step=evaluator.global_step,
        checkpoint_manager=manager(tmp_path / "ckpt", evaluator),
        eval_summary_dir=tmp_path / "eval",
    )
    done = tmp_path / "Done"

    def timeout_fn() -> bool:
        done.write_text("")
        return True

    output = controller.evaluate_continuously(steps=2, timeout=1, timeout_fn=timeout_fn)
    assert output is not None and "eval_loss" in output
    assert done.exists()
    assert [s for s, _ in scalars(tmp_path / "eval")["eval_loss"]] == [5]


# ------------------------------------------------------------- actions and loops


def test_actions_receive_raw_outputs(tmp_path):
    train_outputs: list[Any] = []
    eval_outputs: list[Any] = []
    runner = TestRunner()
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        train_actions=[train_outputs.append],
        eval_actions=[eval_outputs.append],
    )
    controller.train_and_evaluate(train_steps=10, eval_steps=2, eval_interval=6)
    assert len(train_outputs) == 5 and all(out["loss"] >= 0 for out in train_outputs)
    assert len(eval_outputs) == 2 and all(out["eval_loss"] >= 0 for out in eval_outputs)
    assert all("steps_per_second" not in out for out in train_outputs + eval_outputs)


def test_steps_per_loop_callable_gets_current_step():
    runner = TestRunner()
    seen: list[int] = []

    def steps_per_loop(step: int) -> int:
        seen.append(step)
        return 4 if step > 4 else 2

    looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=steps_per_loop
    ).train(steps=10)
    assert int(runner.global_step) == 10
    assert runner.train_calls == [0, 2, 4, 6]
    assert seen == [0, 2, 4, 6]


def test_summary_interval_writes_at_multiples_only(tmp_path):
    runner = TestRunner()
    looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=2,
        summary_interval=4,
        summary_dir=tmp_path,
    ).train(steps=10)
    assert [s for s, _ in scalars(tmp_path)["loss"]] == [4, 8]


def test_train_until_data_ends_with_short_final_loop(tmp_path):
    runner = TestRunner(epochs=1)  # 100 batches, then the data ends
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=30,
        checkpoint_manager=manager(tmp_path, runner, checkpoint_interval=30),
    )
    controller.train(steps=-1)
    assert int(runner.global_step) == 100
    assert runner.train_calls == [0, 30, 60, 90]
    assert steps_on_disk(tmp_path)[-1] == 100


def test_trainer_that_never_advances_step_stops_with_warning(caplog):
    class Stuck(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(train_dataset=None)
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            pass

    trainer = Stuck()
    controller = looproto.Controller(
        trainer=trainer, global_step=trainer.global_step, steps_per_loop=5
    )
    with caplog.at_level(logging.WARNING, logger="looproto"):
        controller.train(steps=10)
    assert "did not advance `global_step`" in caplog.text


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, looproto.ConfigError, "`trainer` and `evaluator` should not both be `None`"),
        ({"trainer": "T"}, looproto.ConfigError, "`steps_per_loop` is required"),
        ({"trainer": "T", "steps_per_loop": 0}, looproto.ConfigError, "steps_per_loop=0"),
        ({"trainer": "T", "steps_per_loop": -1}, looproto.ConfigError, "positive int"),
        ({"trainer": "T", "steps_per_loop": 2.0}, looproto.ConfigError, "steps_per_loop=2.0"),
        ({"trainer": "T", "steps_per_loop": True}, looproto.ConfigError, "steps_per_loop=True"),
        (
            {"trainer": "T", "steps_per_loop": 2, "summary_interval": 0},
            looproto.ConfigError,
            "summary_interval=0",
        ),
        (
            {"trainer": "T", "steps_per_loop": 2, "summary_interval": np.int64(8)},
            looproto.ConfigError,
            r"summary_interval=np.int64\(8\)",
        ),
        (
            {"trainer": "T", "steps_per_loop": 2, "summary_interval": 3},
            looproto.ConfigError,
            r"`summary_interval` \(3\) must be a multiple of `steps_per_loop` \(2\)",
        ),
        (
            {"trainer": "T", "steps_per_loop": 2, "global_step": 5},
            looproto.ConfigError,
            "`global_step` must be a variable",
        ),
        (
            {"trainer": "T", "steps_per_loop": 2, "train_actions": [1]},
            looproto.ProtocolError,
            "train_actions",
        ),
        ({"trainer": object(), "steps_per_loop": 2}, looproto.ProtocolError, "`trainer` must"),
        ({"evaluator": object()}, looproto.ProtocolError, "`evaluator` must"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, error, match):
    runner = TestRunner()
    if kwargs.get("trainer") == "T":
        kwargs["trainer"] = runner
    kwargs.setdefault("global_step", runner.global_step)
    with pytest.raises(error, match=match):
        looproto.Controller(**kwargs)


def test_global_step_must_be_scalar_integer():
    runner = TestRunner()
    with pytest.raises(looproto.ConfigError, match="scalar integer"):
        looproto.Controller(trainer=runner, steps_per_loop=1, global_step=runner.w)


def test_methods_require_their_components(tmp_path):
    runner = TestRunner()
    trainer_only = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=2
    )
    with pytest.raises(looproto.ConfigError, match=r"`evaluator` is not set.*`evaluate\(\)`"):
        trainer_only.evaluate()
    with pytest.raises(looproto.ConfigError, match=r"`evaluator` is not set.*train_and_evaluate"):
        trainer_only.train_and_evaluate(10)
    with pytest.raises(looproto.ConfigError, match="`checkpoint_manager` is not set"):
        trainer_only.save_checkpoint()
    eval_only = looproto.Controller(evaluator=runner, global_step=runner.global_step)
    with pytest.raises(looproto.ConfigError, match=r"`trainer` is not set.*`train\(\)`"):
        eval_only.train(10)
    with pytest.raises(looproto.ConfigError, match="`checkpoint_manager` is not set"):
        eval_only.evaluate_continuously()
    with pytest.raises(looproto.ConfigError, match=r"`steps` \(0\) should be > 0, or == -1"):
        eval_only.evaluate(steps=0)
    with pytest.raises(looproto.ConfigError, match="`steps` must be an int"):
        trainer_only.train(steps=2.5)  # type: ignore[arg-type]


def test_non_numeric_output_leaf_is_rejected():
    class BadOutput(TestRunner):
        def train_loop_end(self) -> dict[str, Any]:
            return {"loss": "low"}

    runner = BadOutput()
    controller = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=2
    )
    with pytest.raises(looproto.ProtocolError, match="'low'"):
        controller.train(steps=2)


def test_garbage_in_checkpoint_dir_and_broken_newest_step_fall_back(tmp_path, caplog):
    runner = TestRunner()
    looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=5,
        checkpoint_manager=manager(tmp_path, runner, checkpoint_interval=5),
    ).train(steps=10)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "15.orbax-checkpoint-tmp").mkdir()  # a half-written step
    # Break the newest step's array data.
    state_dir = tmp_path / "10" / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 200]
    target = max(data_files, key=lambda p: p.stat().st_size)
    blob = bytearray(target.read_bytes())
    blob[100:164] = bytes(64)
    target.write_bytes(bytes(blob))

    fresh = TestRunner()
    with caplog.at_level(logging.WARNING):
        looproto.Controller(
            trainer=fresh,
            global_step=fresh.global_step,
            steps_per_loop=5,
            checkpoint_manager=manager(tmp_path, fresh, checkpoint_interval=5),
        )
    assert int(fresh.global_step) == 5
    assert "10" in caplog.text


# --------------------------------------------------------------- reliability


def test_check_finite_stops_at_the_loop_whose_output_is_nan_before_saving_it(tmp_path):
    runner = TestRunner(learning_rate=10.0)  # diverges within a few loops
    checkpoints = manager(tmp_path / "ckpt", runner, checkpoint_interval=4)
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=4,
        checkpoint_manager=checkpoints,
        summary_dir=tmp_path / "summaries",
        check_finite=True,
    )
    # NumPy warns as the weights overflow: that is the divergence being tested.
    with pytest.raises(looproto.NonFiniteError) as info, np.errstate(all="ignore"):
        controller.train(steps=400)
    step = int(runner.global_step)
    message = str(info.value)
    assert message.startswith(
        f"Training diverged: train output 'loss' is inf after steps {step - 3}-{step} "
        f"(global step {step}). Stopped before writing its summaries or a checkpoint; "
    ), message
    assert message.endswith(f"the newest checkpoint, {tmp_path / 'ckpt' / str(step - 4)}, is kept.")
    assert steps_on_disk(tmp_path / "ckpt")[-1] == step - 4
    assert [s for s, _ in scalars(tmp_path / "summaries")["loss"]][-1] == step - 4
    checkpoints.close()


def test_without_check_finite_a_nan_output_is_logged_as_before(tmp_path):
    runner = TestRunner(learning_rate=10.0)
    controller = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=4
    )
    with np.errstate(all="ignore"):
        controller.train(steps=100)
    assert int(runner.global_step) == 100
    with pytest.raises(looproto.ConfigError, match=r"`check_finite` must be a bool"):
        looproto.Controller(
            trainer=runner, global_step=runner.global_step, steps_per_loop=4, check_finite=1
        )


def test_train_and_evaluate_minus_one_trains_until_the_data_ends(tmp_path):
    runner = TestRunner(epochs=1)  # 100 batches
    checkpoints = manager(tmp_path / "ckpt", runner)
    controller = looproto.Controller(
        trainer=runner,
        evaluator=runner,
        global_step=runner.global_step,
        steps_per_loop=8,
        checkpoint_manager=checkpoints,
        eval_summary_dir=tmp_path / "eval",
    )
    controller.train_and_evaluate(train_steps=-1, eval_steps=2, eval_interval=40)
    assert int(runner.global_step) == 100
    assert [s for s, _ in scalars(tmp_path / "eval")["eval_loss"]] == [40, 80, 100]
    assert steps_on_disk(tmp_path / "ckpt") == [100]
    checkpoints.close()


def test_evaluate_continuously_skips_a_checkpoint_deleted_before_it_was_read(tmp_path):
    runner = TestRunner()
    with manager(tmp_path, runner) as writer:
        for step in (1, 2):
            runner.global_step.assign(step)
            writer.save()
    reader_runner = TestRunner()
    reader = manager(tmp_path, reader_runner, read_only=True)
    controller = looproto.Controller(
        evaluator=reader_runner, global_step=reader_runner.global_step, checkpoint_manager=reader
    )
    original = reader.restore
    seen = []

    def restore_after_the_owner_pruned(path):
        seen.append(path)
        if path.endswith("/2") and len(seen) == 1:
            # The owner's retention deletes step 2 just as it was listed; 3 replaces it.
            with manager(tmp_path, runner, max_to_keep=1) as owner:
                runner.global_step.assign(3)
                owner.save()
        return original(path)

    reader.restore = restore_after_the_owner_pruned
    output = controller.evaluate_continuously(steps=2, timeout=0.5)
    assert seen == [str(tmp_path / "2"), str(tmp_path / "3")]
    assert int(reader_runner.global_step) == 3 and "eval_loss" in output


# ------------------------------------------------ the restored step is the checkpoint's


def test_a_restored_step_counter_that_is_not_in_the_checkpoint_is_refused(tmp_path):
    # The global step kept apart from what the manager saves: after a restart the
    # weights would be those of step 10 while training went on from step 0.
    runner = TestRunner()
    ckpt = CheckpointManager(
        tmp_path, {"w": runner.w, "b": runner.b}, step_counter=runner.global_step
    )
    controller = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=5, checkpoint_manager=ckpt
    )
    controller.train(steps=10)
    assert steps_on_disk(tmp_path) == [10]

    restarted = TestRunner()
    again = CheckpointManager(
        tmp_path, {"w": restarted.w, "b": restarted.b}, step_counter=restarted.global_step
    )
    with pytest.raises(
        looproto.CheckpointError,
        match=r"global step is not part of what was checkpointed.*checkpoint 10.*reads 0",
    ):
        looproto.Controller(
            trainer=restarted,
            global_step=restarted.global_step,
            steps_per_loop=5,
            checkpoint_manager=again,
        )
    # Evaluation only: the step labels the summaries, nothing resumes from it.
    evaluation = looproto.Controller(
        evaluator=restarted, global_step=restarted.global_step, checkpoint_manager=again
    )
    assert evaluation.restore_checkpoint() == str(tmp_path / "10")
