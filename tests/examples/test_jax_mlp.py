"""The JAX example, run as a user runs it: it learns, writes what it says, and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import looproto  # noqa: E402
from looproto.checkpoint import read_metadata  # noqa: E402
from looproto.examples import jax_mlp, numpy_mlp  # noqa: E402
from looproto.module import variable_to_numpy, variables_by_path  # noqa: E402
from tests.helpers import scalars  # noqa: E402


def run_example(model_dir: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "looproto.examples.jax_mlp", "--model-dir", model_dir, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_example_learns_writes_summaries_and_checkpoints_and_resumes(tmp_path: Any) -> None:
    model_dir = str(tmp_path / "run")
    first = run_example(model_dir, "--steps", "600", "--eval-interval", "300")
    assert "Trained steps 0 -> 600" in first
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    assert [step for step, _ in train["loss"]] == list(range(100, 601, 100))
    losses = [value for _, value in train["loss"]]
    assert losses[-1] < 0.5 * losses[0]
    evals = scalars(os.path.join(model_dir, "summaries", "eval"))
    assert [step for step, _ in evals["eval_loss"]] == [300, 600]
    assert evals["eval_loss"][1][1] < evals["eval_loss"][0][1]
    mae = scalars(os.path.join(model_dir, "summaries", "eval"), "metrics")["mae"]
    assert [step for step, _ in mae] == [300, 600]

    # The checkpoints hold the trainer's state by path; read one back into a fresh trainer.
    checkpoints = os.path.join(model_dir, "checkpoints")
    meta = read_metadata(checkpoints)
    assert meta["step"] == 600 and meta["steps"] == [100, 600]
    assert meta["tree"]["model/layers/0/w"]["shape"] == [8, 32]
    assert meta["tree"]["global_step"]["dtype"] == "int64"
    fresh = jax_mlp.make_trainer()
    looproto.CheckpointManager(checkpoints, fresh).restore(600)
    assert int(fresh.global_step) == 600
    assert isinstance(fresh.model.layers[0].w.value, jax.Array)
    assert fresh._train_iter.get_state() == meta["objects"]["_train_iter"]["state"]

    second = run_example(model_dir, "--steps", "800", "--eval-interval", "300")
    assert "Trained steps 600 -> 800" in second
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    assert [step for step, _ in train["loss"]][-2:] == [700, 800]
    assert read_metadata(checkpoints)["steps"] == [100, 600, 800]


@pytest.mark.parametrize("data", ["stack", "device"])
def test_resumed_example_matches_an_uninterrupted_run(tmp_path: Any, data: str) -> None:
    kwargs: dict[str, Any] = {"steps_per_loop": 50, "checkpoint_interval": 50}
    straight, straight_trainer = jax_mlp.make_controller(str(tmp_path / "a"), **kwargs)
    with straight:
        straight.train(steps=200)

    # Half on the other data option: the checkpoint does not depend on it.
    first, _ = jax_mlp.make_controller(str(tmp_path / "b"), data=data, **kwargs)
    with first:
        first.train(steps=100)
    resumed, resumed_trainer = jax_mlp.make_controller(str(tmp_path / "b"), data=data, **kwargs)
    assert int(resumed_trainer.global_step) == 100
    with resumed:
        resumed.train(steps=200)
    expected = variables_by_path(straight_trainer)
    for path, variable in variables_by_path(resumed_trainer).items():
        np.testing.assert_allclose(
            variable_to_numpy(variable), variable_to_numpy(expected[path]), rtol=1e-6, err_msg=path
        )


def test_same_tree_dtypes_and_initial_weights_as_the_numpy_example() -> None:
    def tree(trainer: Any) -> dict[str, Any]:
        return {
            path: (variable_to_numpy(v).shape, variable_to_numpy(v).dtype)
            for path, v in variables_by_path(trainer).items()
        }

    assert tree(jax_mlp.make_trainer()) == tree(numpy_mlp.make_trainer())
    jax_vars = variables_by_path(jax_mlp.MLP(n_in=8))
    for path, variable in variables_by_path(numpy_mlp.MLP(n_in=8)).items():
        np.testing.assert_array_equal(variable_to_numpy(jax_vars[path]), variable.numpy())


def test_follows_the_numpy_example_and_resumes_its_checkpoint(tmp_path: Any) -> None:
    # Same data, initialisation, shuffling and update rule: only the gradient's source
    # differs (autodiff inside one jitted scan vs hand-written backprop).
    np_controller, np_trainer = numpy_mlp.make_controller(str(tmp_path / "numpy"))
    jax_controller, jax_trainer = jax_mlp.make_controller(str(tmp_path / "jax"))
    with np_controller, jax_controller:
        np_controller.train(steps=300)
        jax_controller.train(steps=300)
    np_losses = scalars(str(tmp_path / "numpy" / "summaries" / "train"))["loss"]
    jax_losses = scalars(str(tmp_path / "jax" / "summaries" / "train"))["loss"]
    assert [s for s, _ in jax_losses] == [s for s, _ in np_losses] == [100, 200, 300]
    np.testing.assert_allclose([v for _, v in jax_losses], [v for _, v in np_losses], rtol=1e-4)
    for a, b in zip(jax_trainer.model.layers, np_trainer.model.layers):
        np.testing.assert_allclose(a.w.numpy(), b.w.numpy(), rtol=1e-4, atol=1e-6)

    # The NumPy run's checkpoint (step 100, the first save) resumes on JAX, data position
    # included, and the result tracks the NumPy run to step 300.
    resumed, resumed_trainer = jax_mlp.make_controller(str(tmp_path / "from_numpy"))
    resumed.checkpoint_manager.restore(os.path.join(tmp_path, "numpy", "checkpoints", "100"))
    assert int(resumed_trainer.global_step) == 100
    with resumed:
        resumed.train(steps=300)
    np_vars = variables_by_path(np_trainer)
    for path, variable in variables_by_path(resumed_trainer).items():
        np.testing.assert_allclose(
            variable_to_numpy(variable), variable_to_numpy(np_vars[path]), rtol=1e-4, atol=1e-6
        )
