"""One model_dir, many processes: `looproto train` beside evaluators, inspectors, a rival.

A real trainer saves a checkpoint after every inner loop (24 saves, each held open
for a while before orbax's commit rename, so that an unfinished save is on disk most
of the time) and prunes all but two. Beside it, on the same model_dir:
`looproto evaluate --continuous`, one-shot `looproto evaluate` and `looproto inspect`
started again and again (each opens the directory while a save is under way and
while steps are being deleted), and a second `looproto train`, which must fail at once
naming the first. The trainer never fails, every evaluation restores a complete
checkpoint (its weights are those of its step, checked value by value), and every
process exits cleanly.

The factories are this module's (`tests.test_shared_model_dir:trainer`): the command
imports them from the repository root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from tests.helpers import scalars

ROOT = Path(__file__).resolve().parent.parent
SAVES = 24
SIZE = 2_000_000  # float32 values: 8 MB of incompressible data per checkpoint
READER_ROUNDS = 4  # one-shot `evaluate` + `inspect` pairs started during training

pytestmark = pytest.mark.slow


def _weights(step: int) -> np.ndarray[Any, Any]:
    """The weights at `step`: fixed noise (compresses no better than real weights), step first."""
    weights = np.random.default_rng(0).standard_normal(SIZE, dtype=np.float32)
    weights[0] = float(step)
    return weights


class Slab(looproto.StandardTrainer, looproto.StandardEvaluator):
    """A trainer whose weights say which step they belong to; evaluates that they do."""

    def __init__(self) -> None:
        looproto.StandardTrainer.__init__(self, train_dataset=None)
        looproto.StandardEvaluator.__init__(self, eval_dataset=None)
        self.global_step = looproto.create_global_step()
        self.w = looproto.Variable(_weights(0), trainable=False)
        self.noise = _weights(0)

    def train_step(self, iterator: Any) -> None:
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        weights = self.noise.copy()
        weights[0] = float(int(self.global_step))
        self.w.assign(weights)
        return {"w0": np.float32(weights[0])}

    def eval_step(self, iterator: Any) -> None:
        return None

    def eval_end(self, *args: Any) -> dict[str, Any]:
        weights = self.w.numpy()
        return {
            "w0": np.float32(weights[0]),
            "intact": np.float32(np.array_equal(weights[1:], self.noise[1:])),
        }


def trainer(model_dir: str, commit_delay: float = 0.0) -> Slab:
    """The trainer; with `commit_delay`, each save waits that long before it commits."""
    if commit_delay:
        checkpoints = os.path.abspath(os.path.join(model_dir, "checkpoints"))
        rename = os.rename

        def slow_commit(src: Any, dst: Any, **kwargs: Any) -> None:
            # orbax commits `<step>.orbax-checkpoint-tmp` by renaming it to `<step>`: the
            # unfinished save stays on disk this much longer, for the others to meet.
            if os.path.dirname(os.fspath(dst)) == checkpoints and os.fspath(dst)[-1].isdigit():
                time.sleep(commit_delay)
            rename(src, dst, **kwargs)

        os.rename = slow_commit
    return Slab()


def evaluator(trainer: Slab) -> Slab:
    return trainer


_CONFIG = f"""
backend = "numpy"
[trainer]
factory = "tests.test_shared_model_dir:trainer"
commit_delay = 0.4
[evaluator]
factory = "tests.test_shared_model_dir:evaluator"
[train]
steps = {SAVES}
steps_per_loop = 1
eval_steps = 1
[evaluate]
steps = 1
[checkpoint]
interval = 1
max_to_keep = 2
"""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """The processes a test starts; any still running at its end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def looproto_cmd(started: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("LOOPROTO_BACKEND", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "looproto", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_clean(err: str) -> None:
    for bad in ("Traceback", "corrupted", "unreadable", "Exception", "failed", "Not saving"):
        assert bad not in err, err[-3000:]


def test_evaluators_and_inspectors_beside_a_trainer_on_one_model_dir(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(_CONFIG)
    model_dir = tmp_path / "run"
    checkpoints = model_dir / "checkpoints"
    sets = ["--set", f"model_dir={model_dir}"]
    start = time.monotonic()
    train = looproto_cmd(started, "train", str(config), "--no-progress", *sets)
    assert train.stderr is not None
    log: list[str] = []
    for line in train.stderr:  # the trainer owns the directory once it restores
        log.append(line)
        if line.startswith("restoring"):
            break
    # It stops 15 s after the newest checkpoint appeared (once the trainer is done).
    continuous = looproto_cmd(
        started, "evaluate", str(config), "--continuous", "--timeout", "15", *sets
    )

    # A second trainer on the same model_dir fails at once, naming the first.
    rival = looproto_cmd(started, "train", str(config), "--no-progress", *sets)
    code, _, err = finish(rival)
    assert code == 4, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"is in use by process {train.pid} on host" in lines[0], err

    # Readers that start, list, read and exit while saves are under way and steps go.
    readers = 0
    while train.poll() is None and readers < READER_ROUNDS:
        shot = looproto_cmd(started, "evaluate", str(config), *sets)
        inspect = looproto_cmd(started, "inspect", str(checkpoints), "--json")
        for proc in (shot, inspect):
            code, out, err = finish(proc)
            if proc is inspect and code == 2 and "No checkpoints in" in err:
                continue  # before the first save
            assert code == 0, err[-3000:]
            assert_clean(err)
        readers += 1
    code, out, err = finish(train)
    trained = time.monotonic() - start
    err = "".join(log) + err
    assert code == 0, err[-3000:]
    assert_clean(err)
    assert f"trained to step {SAVES}" in out
    saved = re.findall(r"saved checkpoint to .*/(\d+)\.", err)
    assert [int(step) for step in saved] == list(range(1, SAVES + 1))

    code, out, err = finish(continuous)
    assert code == 0, err[-3000:]
    assert_clean(err)
    evaluations = scalars(model_dir / "summaries" / "eval")
    evaluated = [step for step, _ in evaluations["w0"]]
    # Every evaluation restored a whole checkpoint of its own step.
    assert evaluations["w0"] == [(step, float(step)) for step in evaluated]
    assert evaluations["intact"] == [(step, 1.0) for step in evaluated]
    assert len(set(evaluated)) >= 3, evaluated
    assert sorted(os.listdir(checkpoints)) == [str(SAVES - 1), str(SAVES)]
    print(
        f"\n{SAVES} saves in {trained:.1f} s beside {readers} rounds of one-shot readers; "
        f"{len(evaluated)} evaluations at steps {evaluated}"
    )
