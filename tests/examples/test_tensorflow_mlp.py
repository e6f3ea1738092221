"""The TensorFlow example, run as a user runs it; its resume matches an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from looproto.examples import numpy_mlp, tensorflow_mlp
from looproto.module import variable_to_numpy, variables_by_path
from tests.helpers import scalars


def test_example_learns_writes_summaries_and_checkpoints_and_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "looproto.examples.tensorflow_mlp", "--model-dir", model_dir]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.run(
        [*cmd, "--steps", "600", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "Trained steps 0 -> 600" in first.stdout
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    losses = [value for _, value in train["loss"]]
    assert [step for step, _ in train["loss"]] == list(range(100, 601, 100))
    assert losses[-1] < 0.5 * losses[0]
    evals = scalars(os.path.join(model_dir, "summaries", "eval"))
    assert [step for step, _ in evals["eval_loss"]] == [300, 600]
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["100", "600"]

    second = subprocess.run(
        [*cmd, "--steps", "800", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "Trained steps 600 -> 800" in second.stdout


def test_resumed_example_matches_an_uninterrupted_run(tmp_path):
    straight, straight_trainer = tensorflow_mlp.make_controller(
        str(tmp_path / "a"), steps_per_loop=50, checkpoint_interval=50
    )
    straight.train(steps=150)
    first, _ = tensorflow_mlp.make_controller(
        str(tmp_path / "b"), steps_per_loop=50, checkpoint_interval=50
    )
    first.train(steps=100)
    resumed, resumed_trainer = tensorflow_mlp.make_controller(
        str(tmp_path / "b"), steps_per_loop=50, checkpoint_interval=50
    )
    assert int(resumed_trainer.global_step.numpy()) == 100
    resumed.train(steps=150)
    for a, b in zip(straight_trainer.variables, resumed_trainer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_same_tree_and_initial_weights_as_the_numpy_example():
    tf_model = tensorflow_mlp.MLP(n_in=8)
    np_model = numpy_mlp.MLP(n_in=8)
    tf_vars, np_vars = variables_by_path(tf_model), variables_by_path(np_model)
    assert sorted(tf_vars) == sorted(np_vars)
    for path, variable in np_vars.items():
        np.testing.assert_array_equal(variable_to_numpy(tf_vars[path]), variable.numpy())


def test_trainer_checkpoints_the_same_tree_as_the_numpy_example():
    def arrays(trainer):
        return {path: variable_to_numpy(v).shape for path, v in variables_by_path(trainer).items()}

    assert arrays(tensorflow_mlp.make_trainer()) == arrays(numpy_mlp.make_trainer())
