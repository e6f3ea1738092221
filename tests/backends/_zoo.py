"""The state zoo's harness: train, checkpoint, resume in a fresh process, compare.

Each case builds a trainer holding real framework objects. The first child process
runs every case of one backend uninterrupted for `N + M` steps, recording after each
step every array a checkpoint would hold and the learning rates, then builds it again,
trains `N` steps and saves a checkpoint. The second child process builds each case
afresh, restores that checkpoint, trains `M` more steps and records them the same way.
`test_state_zoo.py` compares the records. Run as a program (by the tests)::

    python -m tests.backends._zoo <backend> <first|resume> <directory> [case ...]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import looproto
from looproto.checkpoint._state import collect

ROOT = Path(__file__).resolve().parents[2]
N, M = 6, 6  # Steps before the checkpoint, steps after it.


@dataclasses.dataclass(frozen=True)
class Case:
    """One object (or a few that belong together) in a trainer.

    Attributes:
        name: The case's name (a directory in the run's directory).
        build: Makes the trainer (a `looproto.Module` with a `global_step`).
        lrs: The learning rates (and other per-step schedule values) to record.
        bound: None: the resumed run must equal the uninterrupted one bit for bit.
            Else the largest relative difference allowed (`max|a - b| / max|a|` per
            array), for a case whose resume is known not to be bitwise.
        reset: Called before each build (a compiled case resets Dynamo's caches).
    """

    name: str
    build: Callable[[], Any]
    lrs: Callable[[Any], list[float]]
    bound: float | None = None
    reset: Callable[[], None] | None = None


def _record(case: Case, trainer: Any, steps: int, out: dict[str, Any]) -> None:
    """Trains `steps` steps one at a time, keeping what a checkpoint holds after each."""
    for _ in range(steps):
        trainer.train(1)
        step = int(trainer.global_step)
        arrays, meta = collect(trainer, step)
        for path, array in arrays.items():
            out[f"{step}|{path}"] = array
        out[f"{step}|__lr__"] = np.asarray(case.lrs(trainer), np.float64)
        out["__objects__"] = meta["objects"]  # The JSON states, at the end.


def _save(out: dict[str, Any], directory: Path, name: str) -> None:
    objects = out.pop("__objects__")
    np.savez(directory / f"{name}.npz", **{k.replace("/", "~"): v for k, v in out.items()})
    (directory / f"{name}.json").write_text(json.dumps(objects, sort_keys=True))


def _build(case: Case) -> Any:
    if case.reset is not None:
        case.reset()
    return case.build()


def run_child(cases: Sequence[Case], phase: str, directory: Path) -> None:
    """One phase of every case (see the module docstring)."""
    for case in cases:
        where = directory / case.name
        where.mkdir(parents=True, exist_ok=True)
        if phase == "first":
            out: dict[str, Any] = {}
            _record(case, _build(case), N + M, out)
            _save(out, where, "uninterrupted")
            trainer = _build(case)
            trainer.train(N)
            with looproto.CheckpointManager(where / "checkpoints", trainer) as manager:
                manager.save(checkpoint_number=N)
        else:
            trainer = _build(case)
            with looproto.CheckpointManager(where / "checkpoints", trainer) as manager:
                manager.restore(N)
            out = {}
            _record(case, trainer, M, out)
            _save(out, where, "resumed")


def load(directory: Path, name: str, which: str) -> tuple[dict[str, np.ndarray], Any]:
    """The arrays (`{step: {path: array}}` flattened as `"step|path"`) and final objects."""
    with np.load(directory / name / f"{which}.npz") as data:
        arrays = {key.replace("~", "/"): data[key] for key in data.files}
    objects = json.loads((directory / name / f"{which}.json").read_text())
    return arrays, objects


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))


def compare(directory: Path, case: Case) -> float:
    """Checks a case's resumed run against its uninterrupted one; the worst difference."""
    straight, straight_objects = load(directory, case.name, "uninterrupted")
    resumed, resumed_objects = load(directory, case.name, "resumed")
    after = {k: v for k, v in straight.items() if int(k.partition("|")[0]) > N}
    assert sorted(resumed) == sorted(after)
    steps = {int(k.partition("|")[0]) for k in resumed}
    assert steps == set(range(N + 1, N + M + 1))
    # It trained: the model moved between the checkpoint and the end.
    moved = [
        k.partition("|")[2]
        for k in after
        if k.startswith(f"{N + M}|model/")
        and not np.array_equal(after[k], straight[f"{N}|{k.partition('|')[2]}"])
    ]
    assert moved
    lrs = [k for k in after if k.endswith("|__lr__")]
    for key in lrs:  # Learning rates (and scales) match exactly, whatever the case.
        np.testing.assert_array_equal(resumed[key], after[key], err_msg=key)
    if case.bound is None:
        differ = [k for k in after if not np.array_equal(resumed[k], after[k])]
        assert not differ, f"{len(differ)} of {len(after)} arrays differ: {differ[:10]}"
        assert resumed_objects == straight_objects
        return 0.0
    worst = max(relative_difference(after[k], resumed[k]) for k in after)
    assert worst <= case.bound, worst
    return worst


def spawn(backend: str, phase: str, directory: Path, timeout: float = 900) -> None:
    """Runs one phase of a backend's cases in a fresh Python process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = subprocess.run(
        [sys.executable, "-m", "tests.backends._zoo", backend, phase, str(directory)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"The {backend} zoo's {phase!r} process failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )


def _cases(backend: str) -> list[Case]:
    if backend == "torch":
        from tests.backends import _zoo_torch

        return _zoo_torch.CASES
    from tests.backends import _zoo_keras

    return _zoo_keras.CASES


if __name__ == "__main__":
    backend_name, phase_name, target = sys.argv[1:4]
    wanted = set(sys.argv[4:])
    selected = [c for c in _cases(backend_name) if not wanted or c.name in wanted]
    run_child(selected, phase_name, Path(target))
