"""The README's example, run as a user runs it: it learns, writes what it says, and resumes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from looproto.examples import numpy_mlp
from tests.helpers import scalars


def test_example_learns_writes_summaries_and_checkpoints_and_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "looproto.examples.numpy_mlp", "--model-dir", model_dir]
    first = subprocess.run(
        [*cmd, "--steps", "600", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Trained steps 0 -> 600" in first.stdout
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    losses = [value for _, value in train["loss"]]
    assert [step for step, _ in train["loss"]] == list(range(100, 601, 100))
    assert losses[-1] < 0.5 * losses[0]
    evals = scalars(os.path.join(model_dir, "summaries", "eval"))
    assert [step for step, _ in evals["eval_loss"]] == [300, 600]
    assert [
        step for step, _ in scalars(os.path.join(model_dir, "summaries", "eval"), "metrics")["mae"]
    ] == [300, 600]
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["100", "600"]

    second = subprocess.run(
        [*cmd, "--steps", "800", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Trained steps 600 -> 800" in second.stdout


def test_resumed_example_matches_an_uninterrupted_run(tmp_path):
    straight, straight_trainer = numpy_mlp.make_controller(
        str(tmp_path / "a"), steps_per_loop=50, checkpoint_interval=50
    )
    straight.train(steps=200)

    first, _ = numpy_mlp.make_controller(
        str(tmp_path / "b"), steps_per_loop=50, checkpoint_interval=50
    )
    first.train(steps=100)
    resumed, resumed_trainer = numpy_mlp.make_controller(
        str(tmp_path / "b"), steps_per_loop=50, checkpoint_interval=50
    )
    assert int(resumed_trainer.global_step) == 100
    resumed.train(steps=200)
    for a, b in zip(straight_trainer.model.variables, resumed_trainer.model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
