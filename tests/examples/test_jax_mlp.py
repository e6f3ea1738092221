"""The JAX example, run as a user runs it: it learns, writes what it says, and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import looproto  # noqa: E402
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
    checkpoints = os.path.join(model_dir, "checkpoints")
    assert sorted(os.listdir(checkpoints), key=int) == ["100", "600"]

    # The checkpoint holds the trainer's state by path; read it back into a fresh trainer.
    with open(os.path.join(checkpoints, "600", "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["step"] == 600
    assert {"model/layers/0/w", "velocity/layers/2/b", "global_step"} <= set(meta["tree"])
    _, fresh = jax_mlp.make_controller(str(tmp_path / "elsewhere"))
    looproto.CheckpointManager(checkpoints, fresh).restore(600)
    assert int(fresh.global_step) == 600
    assert isinstance(fresh.model.layers[0].w.value, jax.Array)

    # Resume on the other data option: the checkpoint does not depend on it.
    second = run_example(model_dir, "--steps", "800", "--eval-interval", "300", "--data", "device")
    assert "Trained steps 600 -> 800" in second
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    assert [step for step, _ in train["loss"]][-2:] == [700, 800]
    assert sorted(os.listdir(checkpoints), key=int) == ["100", "600", "800"]


@pytest.mark.parametrize("data", ["stack", "device"])
def test_resumed_example_matches_an_uninterrupted_run(tmp_path: Any, data: str) -> None:
    kwargs: dict[str, Any] = {"steps_per_loop": 50, "checkpoint_interval": 50}
    straight, straight_trainer = jax_mlp.make_controller(str(tmp_path / "a"), **kwargs)
    with straight:
        straight.train(steps=200)

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


def test_matches_the_numpy_example_step_for_step(tmp_path: Any) -> None:
    # Same data, initialisation, shuffling and update rule: only the gradient's source
    # differs (autodiff inside one jitted scan vs hand-written backprop).
    jax_controller, jax_trainer = jax_mlp.make_controller(str(tmp_path / "jax"))
    np_controller, np_trainer = numpy_mlp.make_controller(str(tmp_path / "numpy"))
    with jax_controller, np_controller:
        jax_controller.train(steps=300)
        np_controller.train(steps=300)
    jax_losses = scalars(str(tmp_path / "jax" / "summaries" / "train"))["loss"]
    np_losses = scalars(str(tmp_path / "numpy" / "summaries" / "train"))["loss"]
    assert [s for s, _ in jax_losses] == [s for s, _ in np_losses] == [100, 200, 300]
    np.testing.assert_allclose([v for _, v in jax_losses], [v for _, v in np_losses], rtol=1e-4)
    for a, b in zip(jax_trainer.model.layers, np_trainer.model.layers):
        np.testing.assert_allclose(a.w.numpy(), b.w.numpy(), rtol=1e-4, atol=1e-5)
