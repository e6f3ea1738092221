"""Orbit's `single_task` example, imports renamed, trains and resumes on `looproto.orbit`.

Two processes, as a user would run a training script twice: the first trains to step
200 through `looproto.orbit.Controller` with a `tf.train.CheckpointManager`, writing
summaries and checkpoints; the second, asked for 300 steps, starts at step 200 with
the weights the first ended with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import looproto
from looproto.testing import read_events

from . import suite

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytest.importorskip("sklearn")
if suite.orbit_package() is None:
    pytest.skip(
        "the tf-models-official wheel (Orbit's example) is not installed",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow


def _job(examples: Path, model_dir: Path, steps: int, result: Path) -> dict:
    env = dict(os.environ)
    src = str(Path(looproto.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    script = Path(__file__).with_name("single_task_job.py")
    done = subprocess.run(
        [sys.executable, str(script), str(examples), str(model_dir), str(steps), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(result.read_text())


def test_single_task_trains_writes_summaries_and_checkpoints_and_resumes(tmp_path):
    examples = suite.write_examples(tmp_path / "examples")
    model_dir = tmp_path / "run"

    first = _job(examples, model_dir, 200, tmp_path / "first.json")
    assert (first["start_step"], first["end_step"]) == (0, 200)
    # TensorFlow's interval rule (Orbit's): the first save at once, then every 100 steps
    # since the last one, and one at the end.
    assert [os.path.basename(p) for p in first["checkpoints"]] == [
        "ckpt-50",
        "ckpt-150",
        "ckpt-200",
    ]
    assert first["eval"]["accuracy"] > 0.6  # it learned (chance is 1/3)
    train = read_events(model_dir / "summaries" / "train")
    steps = [step for step, _ in train["."]["training_loss"]]
    assert steps == [50, 100, 150, 200]  # after every inner loop of 50 steps
    losses = [value for _, value in train["."]["training_loss"]]
    assert losses[-1] < losses[0]
    evaluation = read_events(model_dir / "summaries" / "eval")
    assert [step for step, _ in evaluation["."]["accuracy"]] == [100, 200]

    second = _job(examples, model_dir, 300, tmp_path / "second.json")
    assert second["start_step"] == 200  # restored, not restarted
    for resumed, saved in zip(second["start_weights"], first["end_weights"], strict=True):
        np.testing.assert_array_equal(np.asarray(resumed), np.asarray(saved))
    assert second["end_step"] == 300
    # The interval counts from the restored step.
    assert os.path.basename(second["checkpoints"][-1]) == "ckpt-300"
    assert len(second["checkpoints"]) == 4
