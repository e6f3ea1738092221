"""Fault injection: a real training process is killed (SIGKILL, SIGTERM) again and again.

Each chain of runs trains the same NumPy model into one model directory. Every run
but the last is killed at a kill point; the next one resumes from whatever is on
disk. After the last run, the final checkpoint must hold exactly (bit for bit) the
variables, data-iterator position and RNG state of an uninterrupted run, TensorBoard
must show every summary step once with the uninterrupted run's values, and no
damaged or half-written checkpoint may ever have been committed.

Kill points:

* deterministic: the worker kills itself (SIGKILL) at the N-th time it reaches a
  named phase: mid train step, loop end, after a summary write, after a summary
  flush, entering a save, after the host copies, before orbax's commit rename, right
  after it, mid-deletion of an old step, after a save returned (with async saves:
  while the write is still under way);
* seeded random wall-clock SIGKILLs while training runs;
* preemption: SIGTERM at a random time, sometimes followed by a SIGKILL that lands
  in the preemption save.

The worker is this file run as a script (`python -m tests.test_fault_injection`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto.checkpoint import CheckpointManager, latest_step, read_metadata
from looproto.data import ArrayDataset
from looproto.summary import SummaryManager
from tests.helpers import (
    assert_same_positions,
    checkpoint_contents,
    scalars,
    tensorboard_scalars,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 48
STEPS_PER_LOOP = 4
CHECKPOINT_INTERVAL = 8
MAX_TO_KEEP = 2
STEP_DELAY = 0.003  # seconds: spreads a run over ~0.5 s so random kills land anywhere

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------
# The model: shuffled data, an RNG in the step, optimizer state


class NoisyRegression(looproto.StandardTrainer):
    """Linear regression, SGD with momentum and gradient noise from a NumPy Generator.

    Its result depends on the variables, the momentum, the data iterator's position in
    the shuffled stream and the Generator's state: resuming without any of them shows.
    """

    def __init__(self, step_delay: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(200, 4)).astype(np.float32)
        y = (x @ rng.normal(size=(4, 3)) + 0.1).astype(np.float32)
        super().__init__(ArrayDataset({"x": x, "y": y}, 8, shuffle=True, seed=1, epochs=None))
        with self.name_scope:
            self.w = looproto.Variable(np.zeros((4, 3), np.float32), name="w")
            self.b = looproto.Variable(np.zeros(3, np.float32), name="b")
            self.mw = looproto.Variable(np.zeros((4, 3), np.float32), trainable=False)
            self.mb = looproto.Variable(np.zeros(3, np.float32), trainable=False)
        self.noise = np.random.default_rng(7)
        self.global_step = looproto.create_global_step()
        self.loss_sum = looproto.Variable(np.float32(0), trainable=False)
        self.step_delay = step_delay
        self.on_step: Any = None  # the worker's kill hook (mid-step)

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(np.float32(0))

    def train_step(self, iterator: Any) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        batch = next(iterator)
        diff = batch["x"] @ self.w.value + self.b.value - batch["y"]
        gw = batch["x"].T @ diff / len(diff)
        gb = diff.mean(axis=0)
        gw = gw + self.noise.normal(scale=0.01, size=gw.shape).astype(np.float32)
        self.mw.assign(0.9 * self.mw.value + gw)
        self.mb.assign(0.9 * self.mb.value + gb)
        self.w.assign(self.w.value - 0.05 * self.mw.value)
        if self.on_step is not None:
            self.on_step()  # half-way through the update
        self.b.assign(self.b.value - 0.05 * self.mb.value)
        self.loss_sum.assign_add(np.float32(np.mean(diff**2)))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss_sum.numpy() / STEPS_PER_LOOP}


# ----------------------------------------------------------------------------
# The worker


class _Killer:
    """Counts the phases a run passes and SIGKILLs the process at the chosen one."""

    def __init__(self, target: str | None, log_path: str | None) -> None:
        phase, _, count = (target or "").partition(":")
        self.phase = phase
        self.count = int(count) if count else 0
        self.seen = 0
        self.log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log_path else None

    def __call__(self, phase: str) -> None:
        if self.log is not None:
            os.write(self.log, f"{phase}\n".encode())
        if phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # not reached: SIGKILL cannot be caught


def _install_hooks(hit: _Killer, checkpoint_dir: str, loop_end: tuple[Any, str]) -> None:
    import shutil

    def after(cls: Any, name: str, phase: str) -> None:
        original = getattr(cls, name)

        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            hit(phase)
            return result

        setattr(cls, name, wrapped)

    after(*loop_end, "loop_end")
    after(SummaryManager, "write_summaries", "summary_write")
    after(SummaryManager, "flush", "summary_flush")
    after(CheckpointManager, "_collect", "save_collect")
    after(CheckpointManager, "save", "save_end")
    save = CheckpointManager.save

    def save_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        hit("save_start")
        return save(self, *args, **kwargs)

    CheckpointManager.save = save_start  # type: ignore[method-assign]
    rename = os.rename

    def commit_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        # orbax commits a step by renaming `<step>.orbax-checkpoint-tmp` to `<step>`.
        commit = (
            os.path.dirname(os.fspath(dst)) == checkpoint_dir
            and os.path.basename(os.fspath(dst)).isdigit()
        )
        if commit:
            hit("orbax_commit")
        rename(src, dst, **kwargs)
        if commit:
            hit("orbax_committed")

    os.rename = commit_rename
    rmtree = shutil.rmtree

    def deleting_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path).endswith(".looproto-deleting"):
            hit("prune")  # renamed away, files not yet deleted
        rmtree(path, *args, **kwargs)

    shutil.rmtree = deleting_rmtree  # type: ignore[assignment]


def _worker(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--kill", default=None, help="PHASE:N, SIGKILL at the N-th PHASE")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--phase-log", default=None)
    parser.add_argument("--step-delay", type=float, default=STEP_DELAY)
    parser.add_argument("--cli", default=None, help="run `looproto train` on this config")
    args = parser.parse_args(argv)
    checkpoint_dir = os.path.abspath(os.path.join(args.model_dir, "checkpoints"))
    hit = _Killer(args.kill, args.phase_log)
    if args.cli is not None:
        # The `looproto` command itself, with the kill points in it (any backend).
        _install_hooks(hit, checkpoint_dir, (looproto.Controller, "_train_n_steps"))
        from looproto.run import cli

        command = ["train", args.cli, "--no-progress", f"--set=model_dir={args.model_dir}"]
        raise SystemExit(cli.main(command))
    _install_hooks(hit, checkpoint_dir, (NoisyRegression, "train_loop_end"))

    trainer = NoisyRegression(args.step_delay)
    trainer.on_step = lambda: hit("step")
    manager = CheckpointManager(
        checkpoint_dir,
        trainer,
        step_counter=trainer.global_step,
        checkpoint_interval=CHECKPOINT_INTERVAL,
        max_to_keep=MAX_TO_KEEP,
        enable_async=args.async_save,
    )
    controller = looproto.Controller(
        trainer=trainer,
        global_step=trainer.global_step,
        steps_per_loop=STEPS_PER_LOOP,
        checkpoint_manager=manager,
        summary_dir=os.path.join(args.model_dir, "summaries"),
    )
    begin = trainer.train_loop_begin
    started: list[float] = []

    def announce() -> None:  # handlers are installed now: signals are handled
        if not started:
            started.append(time.perf_counter())
            print(f"ready {int(trainer.global_step)}", flush=True)
        begin()

    trainer.train_loop_begin = announce  # type: ignore[method-assign]
    print(f"restored {int(trainer.global_step)}", flush=True)
    controller.train(STEPS)
    controller.close()
    manager.close()
    elapsed = time.perf_counter() - started[0] if started else 0.0
    print(f"done {elapsed:.3f}", flush=True)


# ----------------------------------------------------------------------------
# Running and checking chains


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("LOOPROTO_BACKEND", None)
    return env


class Run:
    """One worker process."""

    def __init__(self, model_dir: Path, index: int, *args: str) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        self.log = model_dir / f"phases-{index}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.test_fault_injection",
                str(model_dir),
                "--phase-log",
                str(self.log),
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_worker_env(),
        )
        self.restored: int | None = None

    def wait_ready(self, timeout: float = 60) -> bool:
        """Waits until training runs; False if the process ended first."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                return False
            if line.startswith("restored"):
                self.restored = int(line.split()[1])
            if line.startswith("ready"):
                return True
        raise AssertionError("the worker did not start training in time")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            if line.startswith("restored"):
                self.restored = int(line.split()[1])
        return self.proc.returncode, out, err

    def last_phase(self) -> str:
        lines = self.log.read_text().split() if self.log.exists() else []
        return lines[-1] if lines else "startup"


def final_state(model_dir: Path) -> dict[str, Any]:
    """The arrays and object states of the newest checkpoint."""
    import orbax.checkpoint as ocp

    checkpoint_dir = model_dir / "checkpoints"
    step = latest_step(checkpoint_dir)
    assert step is not None
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = checkpointer.restore(checkpoint_dir / str(step) / "state")
    return {"step": step, "arrays": arrays, "objects": read_metadata(checkpoint_dir)["objects"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, by the same worker."""
    model_dir = tmp_path_factory.mktemp("reference")
    run = Run(model_dir, 0)
    code, out, err = run.finish()
    assert code == 0, err[-3000:]
    return {
        "state": final_state(model_dir),
        "loss": tensorboard_scalars(model_dir / "summaries")["loss"],
        "seconds": float(out.split("done")[-1]),
    }


def check_against_reference(model_dir: Path, reference: dict[str, Any]) -> None:
    state = final_state(model_dir)
    expected = reference["state"]
    assert state["step"] == expected["step"] == STEPS
    assert state["arrays"].keys() == expected["arrays"].keys()
    for path, array in expected["arrays"].items():
        np.testing.assert_array_equal(state["arrays"][path], array, err_msg=path)
        assert state["arrays"][path].dtype == array.dtype
    # The data position and the gradient-noise Generator's state, exactly.
    assert state["objects"] == expected["objects"]
    # TensorBoard shows each summary step once, with the uninterrupted run's values.
    shown = tensorboard_scalars(model_dir / "summaries")["loss"]
    assert shown == reference["loss"]
    assert [step for step, _ in shown] == list(range(STEPS_PER_LOOP, STEPS + 1, STEPS_PER_LOOP))
    # The raw event files (what `read_events` or tbparse see, no purging) hold every
    # step too, and may repeat the steps a killed run wrote after its last checkpoint.
    raw = scalars(model_dir / "summaries")["loss"]
    assert {step for step, _ in raw} == {step for step, _ in shown}
    assert set(raw) >= set(shown)
    names = os.listdir(model_dir / "checkpoints")
    # A crash never produced a committed-but-damaged step (it would have been set
    # aside as `<step>.corrupted-*` on restore), and nothing is left half-written.
    assert all(name.isdigit() for name in names), names
    assert len(names) <= MAX_TO_KEEP


def run_chain(
    model_dir: Path, kills: list[Any], reference: dict[str, Any], async_save: bool = False
) -> list[str]:
    """Runs one killed process per entry of `kills`, then one to the end; checks it.

    An entry is `"phase:N"` (deterministic SIGKILL), `("random", seconds)` (SIGKILL
    that long after training starts) or `("preempt", seconds, kill_after)` (SIGTERM,
    then SIGKILL `kill_after` seconds later unless None). Returns where each kill
    landed.
    """
    extra = ["--async-save"] if async_save else []
    landed: list[str] = []
    for index, kill in enumerate(kills, start=1):
        if isinstance(kill, str):
            run = Run(model_dir, index, "--kill", kill, *extra)
            code, _, err = run.finish()
            assert code == -signal.SIGKILL, (
                f"{kill} never fired (status {code}, resumed at {run.restored}): {err[-2000:]}"
            )
            assert run.last_phase() == kill.partition(":")[0]
            landed.append(f"{kill.partition(':')[0]}@{run.restored}")
            continue
        run = Run(model_dir, index, *extra)
        if not run.wait_ready():
            code, _, err = run.finish()
            # Only possible if the last kill came after training had ended.
            assert code == 0 and run.restored == STEPS, f"run {index} ({code}): {err[-2000:]}"
            landed.append("nothing left to train")
            continue
        assert run.restored is not None
        # The delay is a fraction of a whole run's time: scale it to what is left (and
        # a little under: asynchronous saves make a run quicker than the reference).
        time.sleep(0.8 * kill[1] * (STEPS - run.restored) / STEPS)
        if kill[0] == "random":
            run.proc.send_signal(signal.SIGKILL)
            code, _, err = run.finish()
            assert code in (-signal.SIGKILL, 0), err[-2000:]
            landed.append(run.last_phase() if code else "after the end")
        else:
            run.proc.send_signal(signal.SIGTERM)
            if kill[2] is not None:
                time.sleep(kill[2])
                run.proc.send_signal(signal.SIGKILL)
            code, _, err = run.finish()
            assert code in (75, -signal.SIGKILL, 0), err[-2000:]
            landed.append(
                {75: "preempted cleanly", 0: "after the end"}.get(code, "during preemption")
                + f" ({run.last_phase()})"
            )
        if run.restored is not None:
            assert run.restored % STEPS_PER_LOOP == 0  # resumed at a loop boundary
    run = Run(model_dir, len(kills) + 1, *extra)
    code, _, err = run.finish()
    assert code == 0, err[-3000:]
    check_against_reference(model_dir, reference)
    missed = ("nothing left to train", "after the end")
    survived = [where for where in landed if not where.startswith(missed)]
    print(f"\n{model_dir.name}: {len(survived)} of {len(kills)} kill points hit: {landed}")
    return landed


# ----------------------------------------------------------------------------
# The chains: 29 kill points (20 deterministic)


def test_sigkill_at_named_phases_across_train_summary_and_save(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_chain(
        tmp_path,
        [
            "step:6",  # mid-update, in the second loop
            "loop_end:3",
            "summary_write:2",  # written, not yet flushed
            "summary_flush:3",  # summaries durable, checkpoint not yet saved
            "save_start:2",
            "save_collect:1",  # host copies and CRC-32s made, nothing written
            "orbax_commit:1",  # all files written, not yet renamed into place
            "orbax_committed:2",  # committed, before retention ran
            "summary_write:1",
        ],
        reference,
    )


def test_sigkill_around_retention_and_repeated_commits(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_chain(
        tmp_path,
        [
            "prune:1",  # an old step renamed away, its files not yet deleted
            "step:9",
            "orbax_committed:1",
            "save_end:2",
            "orbax_commit:1",
            "prune:1",
        ],
        reference,
    )


def test_sigkill_with_asynchronous_saves(tmp_path: Path, reference: dict[str, Any]) -> None:
    run_chain(
        tmp_path,
        [
            "save_end:3",  # save() returned, the background write is under way
            "orbax_commit:2",  # in orbax's background thread
            "prune:1",  # retention runs once the next save finds the last one done
            "summary_flush:3",
            "orbax_committed:1",
        ],
        reference,
        async_save=True,
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_seeded_random_wall_clock_sigkills(
    tmp_path: Path, reference: dict[str, Any], async_save: bool
) -> None:
    rng = random.Random(20240601 + async_save)
    seconds = reference["seconds"]
    kills = [("random", rng.uniform(0.0, seconds)) for _ in range(3)]
    run_chain(tmp_path, kills, reference, async_save=async_save)


def test_preemption_signals_and_a_kill_during_the_preemption_save(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    rng = random.Random(7)
    seconds = reference["seconds"]
    kills = [
        ("preempt", rng.uniform(0.0, seconds), None),
        ("preempt", rng.uniform(0.0, seconds), rng.uniform(0.0, 0.05)),
        ("preempt", rng.uniform(0.0, seconds), rng.uniform(0.0, 0.05)),
    ]
    run_chain(tmp_path, kills, reference)


# ----------------------------------------------------------------------------
# `looproto train` on every backend: kill points in the command itself

_MLP_CONFIG = """
backend = "{backend}"
seed = 0
[trainer]
factory = "looproto.examples.mlp:trainer"
[train]
steps = {steps}
steps_per_loop = 10
[checkpoint]
interval = 20
max_to_keep = 2
"""
CLI_STEPS = 100


def write_mlp_config(directory: Path, backend: str, steps: int = CLI_STEPS) -> Path:
    path = directory / f"mlp_{backend}.toml"
    path.write_text(_MLP_CONFIG.format(backend=backend, steps=steps))
    return path


@pytest.fixture(scope="module")
def cli_references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uninterrupted `looproto train` runs, one per backend, made when first asked for."""
    made: dict[str, Any] = {}

    def reference(backend: str) -> dict[str, Any]:
        if backend not in made:
            base = tmp_path_factory.mktemp(f"reference_{backend}")
            run = Run(base / "run", 0, "--cli", str(write_mlp_config(base, backend)))
            code, _, err = run.finish(timeout=600)
            assert code == 0, err[-3000:]
            made[backend] = {
                "contents": checkpoint_contents(base / "run" / "checkpoints"),
                "loss": tensorboard_scalars(base / "run" / "summaries" / "train")["loss"],
            }
        return made[backend]

    return reference  # type: ignore[return-value]


def check_cli_run(model_dir: Path, backend: str, reference: dict[str, Any]) -> None:
    """The chain's final checkpoint and TensorBoard equal the uninterrupted run's."""
    arrays, objects = checkpoint_contents(model_dir / "checkpoints")
    expected_arrays, expected_objects = reference["contents"]
    assert read_metadata(model_dir / "checkpoints")["step"] == CLI_STEPS
    assert arrays.keys() == expected_arrays.keys()
    for path, array in expected_arrays.items():
        np.testing.assert_array_equal(arrays[path], array, err_msg=path)
    assert_same_positions(backend, objects, expected_objects)
    shown = tensorboard_scalars(model_dir / "summaries" / "train")["loss"]
    assert shown == reference["loss"]
    assert [step for step, _ in shown] == list(range(10, CLI_STEPS + 1, 10))
    names = os.listdir(model_dir / "checkpoints")
    assert all(name.isdigit() for name in names), names  # no lock, tmp or damaged step left
    assert len(names) <= 2


# Two kill points per backend (each process start costs seconds), together covering the
# save's phases; each lands where its chain still has saves to make (the first save at
# step 10, then every 20 steps; the first deletion once a third checkpoint commits).
_CLI_KILLS = {
    # after a loop, before its save; all files written, before the commit rename (a
    # temporary directory the next run removes)
    "jax": ["loop_end:3", "orbax_commit:2"],
    # host copies made, nothing written; mid-deletion of an old step
    "tensorflow": ["save_collect:2", "prune:1"],
    # before the very first commit; committed, before retention ran
    "torch": ["orbax_commit:1", "orbax_committed:2"],
}


@pytest.mark.parametrize("backend", sorted(_CLI_KILLS))
def test_looproto_train_killed_at_named_phases_on_each_backend(
    tmp_path: Path, cli_references: Any, backend: str
) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    reference = cli_references(backend)
    config = str(write_mlp_config(tmp_path, backend))
    model_dir = tmp_path / "run"
    landed = []
    for index, kill in enumerate(_CLI_KILLS[backend], start=1):
        run = Run(model_dir, index, "--cli", config, "--kill", kill)
        code, _, err = run.finish(timeout=600)
        assert code == -signal.SIGKILL, f"{kill} never fired (status {code}): {err[-2000:]}"
        assert run.last_phase() == kill.partition(":")[0]
        landed.append(f"{kill} (newest step {latest_step(model_dir / 'checkpoints')})")
    run = Run(model_dir, len(_CLI_KILLS[backend]) + 1, "--cli", config)
    code, out, err = run.finish(timeout=600)
    assert code == 0, err[-3000:]
    assert f"trained to step {CLI_STEPS}" in out
    check_cli_run(model_dir, backend, reference)
    print(f"\n{backend}: {landed}")


# ----------------------------------------------------------------------------
# The environment fails: read-only, full disk, files and links where directories go


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root with CAP_SYS_ADMIN only; skips the test otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def looproto_train(config: Path, model_dir: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("LOOPROTO_BACKEND", None)
    args = [f"--set={item}" for item in (f"model_dir={model_dir}", *sets)]
    return subprocess.run(
        [sys.executable, "-m", "looproto", "train", str(config), "--no-progress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line `looproto` printed for its error (after the log, if any)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("looproto:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])  # nothing after it (no thread noise)
    return errors[0]


def test_full_disk_mid_run_exits_4_keeps_the_checkpoints_and_resumes_exactly(
    tmp_path: Path, cli_references: Any
) -> None:
    reference = cli_references("numpy")
    config = write_mlp_config(tmp_path, "numpy")
    # Room for the summaries and two checkpoints, not for a third beside them.
    with tmpfs(tmp_path / "disk", "200k") as disk:
        result = looproto_train(config, disk / "run")
        assert result.returncode == 4, result.stderr[-3000:]
        line = error_line(result)
        assert "No space left on device (ENOSPC)" in line, line
        assert line.startswith("looproto: error: Saving checkpoint ")
        kept = latest_step(disk / "run" / "checkpoints")
        assert kept is not None and 0 < kept < CLI_STEPS
        # What was kept is whole, and the failed save gave its space back.
        read_metadata(disk / "run" / "checkpoints", kept)
        assert all(name.isdigit() for name in os.listdir(disk / "run" / "checkpoints"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resumed = looproto_train(config, disk / "run")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"restored from checkpoint: {disk / 'run' / 'checkpoints' / str(kept)}" in (
            resumed.stderr
        )
        check_cli_run(disk / "run", "numpy", reference)


def test_read_only_model_dir_exits_4_before_anything_is_built(tmp_path: Path) -> None:
    config = write_mlp_config(tmp_path, "numpy")
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount
        context: Any = tmpfs(tmp_path / "ro", "1m", "ro")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        context = contextlib.nullcontext(tmp_path / "ro")
    with context as read_only:
        result = looproto_train(config, read_only / "run")
        assert result.returncode == 4, result.stderr[-3000:]
        line = error_line(result)
        assert line.startswith(f"looproto: error: Cannot write in {read_only / 'run'}"), line
        assert "(EROFS)" in line or "(EACCES)" in line, line
        assert "restoring" not in result.stderr  # nothing was built
        assert not (read_only / "run").exists()


@pytest.mark.parametrize("where", ["model_dir", "checkpoints"])
@pytest.mark.parametrize("what", ["file", "dangling symlink"])
def test_a_file_or_dangling_link_where_a_directory_goes_exits_4_before_training(
    tmp_path: Path, where: str, what: str
) -> None:
    config = write_mlp_config(tmp_path, "numpy")
    model_dir = tmp_path / "run"
    target = model_dir if where == "model_dir" else model_dir / "checkpoints"
    target.parent.mkdir(parents=True, exist_ok=True)
    if what == "file":
        target.write_text("not a directory")
        expected = f"looproto: error: {target} is a file; expected a directory."
    else:
        target.symlink_to(tmp_path / "nowhere")
        expected = (
            f"looproto: error: {target} is a dangling symbolic link (to "
            f"{str(tmp_path / 'nowhere')!r}); expected a directory."
        )
    result = looproto_train(config, model_dir)
    assert result.returncode == 4, result.stderr[-3000:]
    assert error_line(result) == expected
    assert "train |" not in result.stderr  # nothing trained
    assert not (model_dir / "summaries" / "train").exists() or not os.listdir(
        model_dir / "summaries" / "train"
    )


if __name__ == "__main__":
    if "--cli" not in sys.argv:
        # tensorboardX imports torch when it can (1-2 s per process); nothing here needs it.
        sys.modules["torch"] = None  # type: ignore[assignment]
    _worker(sys.argv[1:])
