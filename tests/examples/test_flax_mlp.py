"""The Flax NNX + optax example: it learns, resumes, and a resumed run is bit-exact.

The resume is checked across processes, as a preempted job resumes: one process
trains N steps and checkpoints, a fresh one restores and trains M more, and every
array it ends with (parameters, batch statistics, the dropout RNG's key and count,
AdamW's moments and counts) equals, bit for bit, what one uninterrupted N+M run in a
third process ends with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

from looproto.checkpoint import read_metadata
from tests.helpers import scalars

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(model_dir: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "looproto.examples.flax_mlp", "--model-dir", model_dir, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_example_learns_with_its_schedule_and_resumes(tmp_path: Any) -> None:
    model_dir = str(tmp_path / "run")
    first = run_example(model_dir, "--steps", "600", "--eval-interval", "300")
    assert "Trained steps 0 -> 600" in first
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    losses = [value for _, value in train["loss"]]
    assert [step for step, _ in train["loss"]] == list(range(100, 601, 100))
    assert losses[-1] < 0.5 * losses[0]
    rates = [value for _, value in train["learning_rate"]]
    assert rates[0] == pytest.approx(3e-3, rel=1e-5)  # warm-up (100 steps) done at step 100
    assert rates == sorted(rates, reverse=True)  # then cosine decay
    evals = scalars(os.path.join(model_dir, "summaries", "eval"))
    assert evals["eval_loss"][1][1] < evals["eval_loss"][0][1]

    tree = read_metadata(os.path.join(model_dir, "checkpoints"))["tree"]
    for path in (
        "model/l1/kernel",
        "model/norm/var",
        "model/drop/rngs/key",
        "model/drop/rngs/count",
        "optimizer/step",
        "optimizer/opt_state/0/nu/out/bias",
    ):
        assert path in tree, sorted(tree)

    second = run_example(model_dir, "--steps", "800", "--eval-interval", "300")
    assert "Trained steps 600 -> 800" in second
    train = scalars(os.path.join(model_dir, "summaries", "train"))
    assert [step for step, _ in train["loss"]][-2:] == [700, 800]


_TRAIN = textwrap.dedent(
    """
    import sys
    import numpy as np
    from looproto.examples import flax_mlp
    from looproto.module import variable_to_numpy, variables_by_path

    model_dir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    controller, trainer = flax_mlp.make_controller(
        model_dir, steps_per_loop=25, checkpoint_interval=50
    )
    with controller:
        controller.train(steps=steps)
    arrays = {path: variable_to_numpy(v) for path, v in variables_by_path(trainer).items()}
    position = trainer._train_iter.get_state()
    arrays["_data_position"] = np.asarray([position["epoch"], position["batch"]])
    np.savez(out, **arrays)
    """
)


def _train(model_dir: str, steps: int, out: str) -> dict[str, np.ndarray]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "src")]))
    subprocess.run(
        [sys.executable, "-c", _TRAIN, model_dir, str(steps), out],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    with np.load(out) as saved:
        return dict(saved)


def test_resume_in_a_fresh_process_is_bitwise_an_uninterrupted_run(tmp_path: Any) -> None:
    straight = _train(str(tmp_path / "a"), 150, str(tmp_path / "a.npz"))
    first = _train(str(tmp_path / "b"), 75, str(tmp_path / "b75.npz"))
    assert read_metadata(str(tmp_path / "b" / "checkpoints"))["step"] == 75
    resumed = _train(str(tmp_path / "b"), 150, str(tmp_path / "b150.npz"))

    assert set(resumed) == set(straight)
    assert int(first["model/drop/rngs/count"]) == 75
    assert int(resumed["model/drop/rngs/count"]) == 150
    assert not np.array_equal(first["model/l1/kernel"], resumed["model/l1/kernel"])
    for path, array in straight.items():
        assert resumed[path].dtype == array.dtype, path
        np.testing.assert_array_equal(resumed[path], array, err_msg=path)
