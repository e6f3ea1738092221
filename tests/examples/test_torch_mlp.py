"""The PyTorch example, run as a user runs it: it learns, writes what it says, and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from looproto.examples import torch_mlp  # noqa: E402
from looproto.module import variable_to_numpy, variables_by_path  # noqa: E402
from tests.helpers import scalars  # noqa: E402


def test_example_learns_writes_summaries_and_checkpoints_and_resumes(tmp_path: Any) -> None:
    model_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "looproto.examples.torch_mlp", "--model-dir", model_dir]
    cmd += ["--compiler", "aot_eager", "--nan-check"]  # Compiled, but quick to compile.
    # A tiny model: one intra-op thread is fastest (and shared CI machines stay sane).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(
        [*cmd, "--steps", "600", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "Trained steps 0 -> 600" in first.stdout, first.stdout + first.stderr[-3000:]
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    assert [step for step, _ in train["loss"]] == list(range(100, 601, 100))
    losses = [value for _, value in train["loss"]]
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))
    evals = scalars(os.path.join(model_dir, "summaries", "eval"))
    assert [step for step, _ in evals["eval_loss"]] == [300, 600]
    assert evals["eval_loss"][-1][1] < evals["eval_loss"][0][1]
    mae = scalars(os.path.join(model_dir, "summaries", "eval"), "metrics")["mae"]
    assert [step for step, _ in mae] == [300, 600]
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["100", "600"]

    # The checkpoint holds SGD's momentum under the parameters' names; read it back.
    controller, trainer = torch_mlp.make_controller(model_dir, compile_step=False)
    controller.close()
    assert int(trainer.global_step) == 600
    state = trainer.optimizer.state[trainer.model.layers[0].weight]
    assert float(state["momentum_buffer"].abs().sum()) > 0
    paths = variables_by_path(trainer)
    assert "optimizer/state/layers/0/weight/momentum_buffer" in paths

    second = subprocess.run(
        [*cmd, "--steps", "800", "--eval-interval", "300"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "Trained steps 600 -> 800" in second.stdout, second.stdout + second.stderr[-3000:]
    assert [step for step, _ in scalars(os.path.join(model_dir, "summaries", "train"))["loss"]][
        -2:
    ] == [700, 800]


def test_resumed_example_matches_an_uninterrupted_run(tmp_path: Any) -> None:
    def build(name: str) -> Any:
        return torch_mlp.make_controller(
            str(tmp_path / name), steps_per_loop=50, checkpoint_interval=50, compile_step=False
        )

    straight, straight_trainer = build("a")
    with straight:
        straight.train(steps=200)

    first, _ = build("b")
    with first:
        first.train(steps=100)
    resumed, resumed_trainer = build("b")
    assert int(resumed_trainer.global_step) == 100
    with resumed:
        resumed.train(steps=200)
    expected = variables_by_path(straight_trainer)
    got = variables_by_path(resumed_trainer)
    assert list(got) == list(expected)
    for path, variable in expected.items():
        np.testing.assert_array_equal(
            variable_to_numpy(got[path]), variable_to_numpy(variable), err_msg=path
        )


def test_starts_from_the_numpy_examples_weights() -> None:
    from looproto.examples import numpy_mlp

    model = torch_mlp.MLP(n_in=8)
    reference = numpy_mlp.MLP(n_in=8)
    linears = [m for m in model.layers if isinstance(m, torch.nn.Linear)]
    for linear, dense in zip(linears, reference.layers):
        np.testing.assert_array_equal(linear.weight.detach().numpy().T, dense.w.numpy())
        np.testing.assert_array_equal(linear.bias.detach().numpy(), dense.b.numpy())
