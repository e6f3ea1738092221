"""Two processes on localhost per backend, each on its framework's own engine.

`looproto train CONFIG --num-processes 2` runs the shipped MLP example (torch: gloo +
DistributedDataParallel; JAX: `jax.distributed` with gloo and one global mesh;
TensorFlow: `MultiWorkerMirroredStrategy` from `TF_CONFIG`). Its final checkpoint must
match a one-process run on the same global batches to float tolerance, and the run must
leave exactly one set of summaries and checkpoints. A worker killed mid-run must make
the other exit with looproto's error, within the run's timeout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from looproto.checkpoint import read_metadata
from looproto.run import cli
from looproto.testing import read_events

pytestmark = pytest.mark.slow

BACKENDS = ["jax", "tensorflow", "torch"]

CONFIG = """
backend = "{backend}"
model_dir = "{model_dir}"
seed = 0

[trainer]
factory = "looproto.examples.mlp:trainer"
batch_size = 64

[evaluator]
factory = "looproto.examples.mlp:evaluator"

[train]
steps = 20
steps_per_loop = 5
eval_interval = 10

[checkpoint]
interval = 10
max_to_keep = 10

[distributed]
timeout = {timeout}

# Dynamo without inductor's code generation: the same graphs, compiled in seconds on CI.
[backend_options.torch]
backend = "eager"
"""


def _needs(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")


def _write_config(tmp_path: Path, backend: str, name: str, timeout: float = 60) -> Path:
    path = tmp_path / f"{name}.toml"
    model_dir = tmp_path / name
    path.write_text(CONFIG.format(backend=backend, model_dir=model_dir, timeout=timeout))
    return path


def _environment() -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("LOOPROTO_BACKEND", None)
    return env


def _launch(config: Path, *extra: str, **kwargs: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "looproto", "train", str(config), "--no-progress"]
    return subprocess.Popen(
        [*command, "--num-processes", "2", *extra],
        env=_environment(),
        cwd=config.parent,
        text=True,
        **kwargs,
    )


def _arrays(directory: Path, step: int) -> dict[str, np.ndarray[Any, Any]]:
    import orbax.checkpoint as ocp

    handlers = {"state": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
    return {path: np.asarray(array) for path, array in restored.items()}


def _event_files(root: Path) -> dict[str, list[str]]:
    """Run directory (relative to `root`) -> its event files."""
    found: dict[str, list[str]] = {}
    for directory, _, files in os.walk(root):
        events = sorted(f for f in files if f.startswith("events.out.tfevents"))
        if events:
            found[os.path.relpath(directory, root)] = events
    return found


def _train_one_process_here(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The reference: the same config in this process (no engine: one process is no launch)."""
    one = _write_config(tmp_path, backend, "one")
    monkeypatch.delenv("LOOPROTO_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", str(one), "--no-progress"]) == 0
    return tmp_path / "one"


def _assert_same_run(two: Path, one: Path, backend: str) -> None:
    """`two` (2 processes) left one set of files, and they match `one`'s (1 process)."""
    # Exactly one set of checkpoints, process 0's data only (the chief writes; under JAX
    # orbax leaves the replicated host arrays to process 0 as well).
    ckpt_two, ckpt_one = two / "checkpoints", one / "checkpoints"
    meta_two, meta_one = read_metadata(ckpt_two), read_metadata(ckpt_one)
    assert meta_two["steps"] == meta_one["steps"] == [5, 15, 20]
    assert sorted(os.listdir(ckpt_two)) == ["15", "20", "5"]
    for step in meta_two["steps"]:
        state = ckpt_two / str(step) / "state"
        assert not any("process_1" in name for name in os.listdir(state)), os.listdir(state)
    # The final variables, every one of them, match the one-process run.
    assert meta_two["tree"].keys() == meta_one["tree"].keys()
    final_two, final_one = _arrays(ckpt_two, 20), _arrays(ckpt_one, 20)
    for path, expected in final_one.items():
        np.testing.assert_allclose(final_two[path], expected, rtol=2e-5, atol=2e-6, err_msg=path)
    assert int(final_two["global_step"]) == 20
    # The data position too; a `tf.distribute` iterator's cannot be saved (a warning says so).
    if backend == "tensorflow":
        assert meta_two["objects"] == {} and "_train_iter" in meta_one["objects"]
    else:
        assert meta_two["objects"] == meta_one["objects"]
        assert meta_two["objects"]["_train_iter"]["state"] == {"epoch": 0, "batch": 20}

    # Exactly one set of summaries, written by process 0 alone: one file per run directory.
    files = _event_files(two / "summaries")
    assert sorted(files) == ["eval", "eval/metrics", "train"]
    assert all(len(names) == 1 for names in files.values()), files
    events_two, events_one = read_events(two / "summaries"), read_events(one / "summaries")
    assert events_two.keys() == events_one.keys()
    for run, tags in events_one.items():
        assert events_two[run].keys() == tags.keys(), run
        for tag, points in tags.items():
            assert [s for s, _ in events_two[run][tag]] == [s for s, _ in points], (run, tag)
            if tag != "steps_per_second":
                got = [v for _, v in events_two[run][tag]]
                np.testing.assert_allclose(got, [v for _, v in points], rtol=1e-4, err_msg=tag)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_match_one_on_the_same_global_batch(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs(backend)
    launcher = _launch(
        _write_config(tmp_path, backend, "two"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, err[-4000:]
    assert "trained to step 20" in out and "(2 processes)" in out
    _assert_same_run(
        tmp_path / "two", _train_one_process_here(tmp_path, backend, monkeypatch), backend
    )


def test_looproto_train_runs_unchanged_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs("torch")
    config = _write_config(tmp_path, "torch", "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*torchrun, "-m", "looproto", "train", str(config), "--no-progress"],
        env=_environment(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes)" in result.stdout
    _assert_same_run(
        tmp_path / "two", _train_one_process_here(tmp_path, "torch", monkeypatch), "torch"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_worker_fails_the_other_within_the_timeout(tmp_path: Path, backend: str) -> None:
    _needs(backend)
    timeout = 20
    config = _write_config(tmp_path, backend, "run", timeout=timeout)
    launcher = _launch(
        config,
        "--set=train.steps=1000000",
        "--set=train.eval_interval=1000000",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    assert launcher.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(launcher.stderr or ()), daemon=True)
    reader.start()
    pids: list[int] = []
    try:
        checkpoints = tmp_path / "run" / "checkpoints"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and launcher.poll() is None:
            if not pids:
                match = next(
                    (m for m in map(re.compile(r"pids 0: (\d+), 1: (\d+)").search, lines) if m),
                    None,
                )
                pids = [int(match[1]), int(match[2])] if match else []
            if pids and checkpoints.is_dir() and any(n.isdigit() for n in os.listdir(checkpoints)):
                break  # Training is under way: both workers ran steps and a save together.
            time.sleep(0.1)
        assert pids and launcher.poll() is None, "".join(lines)[-4000:]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=timeout + 60)
        took = time.monotonic() - killed
    finally:
        launcher.kill()
        for pid in pids:  # Never leave a worker behind, whatever failed above.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reader.join(timeout=10)
    launcher.stderr.close()
    text = "".join(lines)
    assert code != 0
    # TensorFlow notices through its coordination service's heartbeats (10 s); gloo at once.
    assert took < timeout + 10, text[-4000:]
    assert "looproto: error: Process 0 of 2: " in text, text[-4000:]
    assert "has died or stopped responding (the run's timeout is 20 s" in text
    assert "looproto: worker 0 exited with status 3" in text
    assert "looproto: worker 1 exited with status -9" in text
