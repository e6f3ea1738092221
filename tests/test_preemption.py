"""Preemption: real signals to real training processes; handlers, exit status, resume.

The subprocess tests run this file as a script (`python -m tests.test_preemption ...`):
see `_worker` at the bottom.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import preemption
from looproto.checkpoint import CheckpointManager, latest_step
from looproto.examples import mlp
from looproto.preemption import EXIT_PREEMPTED, Preempted
from tests.helpers import (
    TestRunner,
    assert_same_positions,
    checkpoint_contents,
    scalars,
    tensorboard_scalars,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_LOOP = 4


class SlowRunner(TestRunner):
    """`TestRunner` whose steps take a while (so a signal lands mid-run), and which can
    ask for preemption itself at a given step (in-process tests)."""

    __test__ = False

    def __init__(self, step_delay: float = 0.0, request_at: int | None = None) -> None:
        super().__init__()
        self.step_delay = step_delay
        self.request_at = request_at
        self.handler_seen: Any = None

    def train_step(self, iterator: Any) -> None:
        self.handler_seen = signal.getsignal(signal.SIGTERM)
        if self.step_delay:
            time.sleep(self.step_delay)
        super().train_step(iterator)
        if self.request_at is not None and int(self.global_step) == self.request_at:
            preemption.request()


def make_controller(model_dir: Path, runner: TestRunner, **kwargs: Any) -> looproto.Controller:
    manager = CheckpointManager(
        model_dir / "ckpt",
        runner,
        step_counter=runner.global_step,
        checkpoint_interval=kwargs.pop("checkpoint_interval", 8),
        max_to_keep=3,
        enable_async=kwargs.pop("enable_async", False),
    )
    return looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=STEPS_PER_LOOP,
        checkpoint_manager=manager,
        summary_dir=str(model_dir / "summaries"),
        **kwargs,
    )


def reference_run(model_dir: Path, steps: int) -> TestRunner:
    runner = TestRunner()
    with make_controller(model_dir, runner) as controller:
        controller.train(steps)
    return runner


@pytest.fixture(autouse=True)
def _no_stale_request() -> Any:
    preemption.clear()
    yield
    preemption.clear()


# ----------------------------------------------------------------------------
# In process


def test_request_stops_at_the_loop_boundary_saves_closes_and_raises(tmp_path: Path) -> None:
    runner = SlowRunner(request_at=6)  # mid-loop: the loop runs on to step 8
    controller = make_controller(tmp_path, runner)
    with pytest.raises(Preempted) as info:
        controller.train(40)
    stop = info.value
    assert isinstance(stop, SystemExit)
    assert stop.code == EXIT_PREEMPTED == 75
    assert (stop.step, stop.signal_number) == (8, None)
    assert stop.checkpoint == str(tmp_path / "ckpt" / "8")
    assert "at step 8" in str(stop)
    assert "run again to resume" in str(stop)
    assert int(runner.global_step) == 8
    assert latest_step(tmp_path / "ckpt") == 8
    assert controller.summary_manager._writers == {}  # closed
    assert [s for s, _ in scalars(tmp_path / "summaries")["loss"]] == [4, 8]
    assert not preemption.requested()  # acted on: a new train() runs normally
    controller.train(12)
    assert int(runner.global_step) == 12


def test_preempted_run_resumes_bit_identically(tmp_path: Path) -> None:
    expected = reference_run(tmp_path / "reference", 40)
    with pytest.raises(Preempted):
        make_controller(tmp_path / "run", SlowRunner(request_at=13)).train(40)
    resumed = SlowRunner()
    controller = make_controller(tmp_path / "run", resumed)
    assert int(resumed.global_step) == 16
    controller.train(40)
    np.testing.assert_array_equal(resumed.w.numpy(), expected.w.numpy())
    np.testing.assert_array_equal(resumed.b.numpy(), expected.b.numpy())


def test_preemption_during_train_and_evaluate_stops_after_the_evaluation(tmp_path: Path) -> None:
    class RequestDuringEval(TestRunner):
        __test__ = False

        def eval_step(self, iterator: Any) -> None:
            super().eval_step(iterator)
            preemption.request()

    runner = RequestDuringEval()
    controller = make_controller(tmp_path, runner, evaluator=runner, checkpoint_interval=None)
    with pytest.raises(Preempted) as info:
        controller.train_and_evaluate(train_steps=40, eval_steps=2, eval_interval=12)
    assert info.value.step == 12
    assert latest_step(tmp_path / "ckpt") == 12
    assert [s for s, _ in scalars(tmp_path / "summaries")["eval_loss"]] == [12]


def test_without_a_checkpoint_manager_preempted_says_nothing_was_saved() -> None:
    runner = SlowRunner(request_at=4)
    controller = looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=STEPS_PER_LOOP
    )
    with pytest.raises(Preempted, match="no checkpoint was saved") as info:
        controller.train(20)
    assert info.value.checkpoint is None


def test_handlers_are_installed_only_during_train_and_restored_after(tmp_path: Path) -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        runner = SlowRunner()
        controller = make_controller(tmp_path, runner)
        controller.train(4)
        assert runner.handler_seen is preemption._handle
        assert signal.getsignal(signal.SIGTERM) is mine
        runner.request_at = 8
        with pytest.raises(Preempted):
            controller.train(20)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_ignored_signal_stays_ignored(tmp_path: Path) -> None:
    # A shell starts a background job with SIGINT ignored: training must not undo that.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen: list[Any] = []
        runner = SlowRunner()
        controller = make_controller(
            tmp_path, runner, train_actions=[lambda _: seen.append(signal.getsignal(signal.SIGINT))]
        )
        controller.train(4)
        assert seen and all(handler is signal.SIG_IGN for handler in seen)
        assert runner.handler_seen is preemption._handle  # SIGTERM is still handled
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_preemption_signals_none_installs_nothing_but_request_still_stops(tmp_path: Path) -> None:
    runner = SlowRunner(request_at=4)
    controller = make_controller(tmp_path, runner, preemption_signals=None)
    with pytest.raises(Preempted):
        controller.train(20)
    assert runner.handler_seen is signal.getsignal(signal.SIGTERM)
    assert runner.handler_seen is not preemption._handle


def test_no_handlers_are_installed_outside_the_main_thread(tmp_path: Path) -> None:
    runner = SlowRunner()
    controller = make_controller(tmp_path, runner)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            controller.train(8)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert errors == []
    assert int(runner.global_step) == 8
    assert runner.handler_seen is not preemption._handle


def test_a_signal_after_the_stop_began_counts_as_the_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(preemption, "_exit_now", exits.append)
    with preemption.watch((signal.SIGUSR1,)):
        preemption._handle(signal.SIGUSR1, None)  # what the first signal does
        assert preemption.requested()
        assert preemption.signal_received() == signal.SIGUSR1
        assert exits == []
        preemption.acknowledge()  # the Controller stops: saving, closing
        assert not preemption.requested()
        preemption._handle(signal.SIGUSR1, None)
        assert exits == [signal.SIGUSR1]  # at once
    exits.clear()
    with preemption.watch((signal.SIGUSR1,)):  # a new watch starts counting afresh
        preemption.clear()
        preemption._handle(signal.SIGUSR1, None)
        assert exits == []


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("SIGTERM", "sequence of signals"),
        ([signal.SIGKILL], "SIGKILL, which a process cannot catch"),
        ([True], "signal numbers"),
        ([1.5], "signal numbers"),
        ([123456], "not a signal"),
        (15, "sequence of signals"),
    ],
)
def test_bad_preemption_signals_raise_config_error(bad: Any, match: str) -> None:
    runner = TestRunner()
    with pytest.raises(looproto.ConfigError, match=f"`preemption_signals`.*{match}"):
        looproto.Controller(
            trainer=runner,
            global_step=runner.global_step,
            steps_per_loop=2,
            preemption_signals=bad,
        )


def test_preempted_pickles_with_its_fields() -> None:
    import pickle

    stop = pickle.loads(pickle.dumps(Preempted(7, signal.SIGTERM, "/x/7")))
    assert (stop.step, stop.signal_number, stop.checkpoint, stop.code) == (7, 15, "/x/7", 75)


# ----------------------------------------------------------------------------
# Real signals, real processes


def start_worker(model_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_preemption", str(model_dir), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"the worker never printed {prefix!r}; stderr:\n{err[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_finishes_the_loop_saves_closes_and_exits_75_then_resume_is_exact(
    tmp_path: Path, signum: signal.Signals
) -> None:
    steps = 80
    expected = reference_run(tmp_path / "reference", steps)
    proc = start_worker(tmp_path / "run", str(steps), "--step-delay", "0.01")
    first = int(wait_for_line(proc, "loop").split()[1])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert f"{signum.name} received: saving a checkpoint and stopping" in err
    stopped = latest_step(tmp_path / "run" / "ckpt")
    assert stopped is not None
    assert first <= stopped < steps
    assert stopped % STEPS_PER_LOOP == 0  # a loop boundary: the loop was finished
    # Summaries were flushed and closed: the last loop's loss is there.
    assert scalars(tmp_path / "run" / "summaries")["loss"][-1][0] == stopped

    done = start_worker(tmp_path / "run", str(steps))
    _, err = done.communicate(timeout=60)
    assert done.returncode == 0, err[-3000:]
    resumed = TestRunner()
    with CheckpointManager(tmp_path / "run" / "ckpt", resumed) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "run" / "ckpt" / str(steps))
    np.testing.assert_array_equal(resumed.w.numpy(), expected.w.numpy())
    np.testing.assert_array_equal(resumed.b.numpy(), expected.b.numpy())
    # TensorBoard shows every loop once, with the values of the uninterrupted run.
    shown = tensorboard_scalars(tmp_path / "run" / "summaries")["loss"]
    reference = tensorboard_scalars(tmp_path / "reference" / "summaries")["loss"]
    assert shown == reference
    assert [s for s, _ in shown] == list(range(STEPS_PER_LOOP, steps + 1, STEPS_PER_LOOP))


def test_a_second_signal_exits_at_once_and_leaves_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    # 25M float32 (100 MB): the preemption save takes long enough to be interrupted.
    proc = start_worker(tmp_path, "400", "--step-delay", "0.01", "--big", "--announce-saves")
    wait_for_line(proc, "saving 0")  # the initial checkpoint, before training
    wait_for_line(proc, "loop")
    proc.send_signal(signal.SIGTERM)
    stopping = wait_for_line(proc, "saving")
    started = time.monotonic()
    time.sleep(0.1)  # into orbax's write (the CRC-32s and host copies come first)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # died of the signal, at once
    assert time.monotonic() - started < 5
    preempt_step = int(stopping.split()[1])
    ckpt = tmp_path / "ckpt"
    newest = latest_step(ckpt)
    assert newest in (0, preempt_step)  # never a half-written step
    runner = BigRunner()
    with CheckpointManager(ckpt, runner) as manager:
        assert manager.restore_or_initialize() == str(ckpt / str(newest))
    assert int(runner.global_step) == newest
    assert float(runner.big.numpy()[0]) == newest  # the values of that step
    assert float(runner.big.numpy()[1]) == float(BigRunner().big.numpy()[1])
    assert not [name for name in os.listdir(ckpt) if not name.isdigit()]  # tmp cleaned


# ----------------------------------------------------------------------------
# `looproto train`, on every backend the MLP example has

_SLOW_FACTORY = """
import time
from looproto.examples import mlp

def trainer(backend, seed=0, delay=0.0):
    # Slows every inner loop down on the host, whatever compiles the loop itself.
    trainer = mlp.trainer(backend, seed=seed)
    end = trainer.train_loop_end
    def slow_end():
        time.sleep(delay)
        return end()
    trainer.train_loop_end = slow_end
    return trainer
"""

_CONFIG = """
backend = "{backend}"
model_dir = "runs/preempted"
[trainer]
factory = "slow_mlp:trainer"
delay = 0.05
[train]
steps = 400
steps_per_loop = 20
[checkpoint]
interval = 100
max_to_keep = 2
"""


def looproto_train(cwd: Path, *overrides: str) -> subprocess.Popen[str]:
    args = [arg for item in overrides for arg in ("--set", item)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("LOOPROTO_BACKEND", None)
    return subprocess.Popen(
        [sys.executable, "-m", "looproto", "train", "run.toml", "--no-progress", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(mlp.IMPLEMENTATIONS))  # each backend as it lands
def test_looproto_train_exits_75_on_sigterm_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, backend: str
) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    (tmp_path / "slow_mlp.py").write_text(_SLOW_FACTORY)
    (tmp_path / "run.toml").write_text(_CONFIG.format(backend=backend))
    reference = looproto_train(tmp_path, "trainer.delay=0.0", "model_dir=runs/reference")
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    proc = looproto_train(tmp_path)
    assert proc.stderr is not None
    for line in proc.stderr:  # the log: wait for the first inner loop to end
        if line.startswith("train | step:") and "steps/sec" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    run = tmp_path / "runs" / "preempted"
    stopped = latest_step(run / "checkpoints")
    assert stopped is not None and stopped < 400
    assert (
        f"looproto: training stopped by SIGTERM at step {stopped}: saved checkpoint "
        f"{run.resolve() / 'checkpoints' / str(stopped)}; run again to resume." in err
    )

    again = looproto_train(tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "trained to step 400" in out
    arrays, objects = checkpoint_contents(run / "checkpoints")
    expected_arrays, expected_objects = checkpoint_contents(
        tmp_path / "runs" / "reference" / "checkpoints"
    )
    assert arrays.keys() == expected_arrays.keys()
    for path, array in expected_arrays.items():
        np.testing.assert_array_equal(arrays[path], array, err_msg=path)
    assert_same_positions(backend, objects, expected_objects)
    shown = tensorboard_scalars(run / "summaries" / "train")["loss"]
    assert shown == tensorboard_scalars(tmp_path / "runs/reference/summaries/train")["loss"]
    assert [step for step, _ in shown] == list(range(20, 401, 20))


# ----------------------------------------------------------------------------
# The worker (run as `python -m tests.test_preemption MODEL_DIR STEPS [options]`)


class BigRunner(SlowRunner):
    """Carries a 100 MB variable whose first element is the global step."""

    __test__ = False

    def __init__(self, step_delay: float = 0.0) -> None:
        super().__init__(step_delay)
        # Random, so that it compresses no better than real weights.
        noise = np.random.default_rng(0).standard_normal(25_000_000, dtype=np.float32)
        noise[0] = 0.0  # the global step
        self.big = looproto.Variable(noise, trainable=False)

    def train_loop_end(self) -> dict[str, Any]:
        big = self.big.numpy()
        big[0] = float(int(self.global_step))
        self.big.assign(big)
        return super().train_loop_end()


def _worker(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--announce-saves", action="store_true")
    args = parser.parse_args(argv)
    if args.announce_saves:
        original = CheckpointManager.save

        def announced(self: CheckpointManager, *a: Any, **kw: Any) -> Any:
            print(f"saving {kw.get('checkpoint_number')}", flush=True)
            return original(self, *a, **kw)

        CheckpointManager.save = announced  # type: ignore[method-assign]
    runner = BigRunner(args.step_delay) if args.big else SlowRunner(args.step_delay)

    def announce(output: Any) -> None:
        print(f"loop {int(runner.global_step)}", flush=True)

    interval = None if args.big else 8
    controller = make_controller(
        args.model_dir, runner, checkpoint_interval=interval, train_actions=[announce]
    )
    if args.big:
        controller.save_checkpoint()
    controller.train(args.steps)  # Preempted is a SystemExit: exit status 75
    controller.close()


if __name__ == "__main__":
    # tensorboardX imports torch when it can (1-2 s); nothing here needs it.
    sys.modules["torch"] = None  # type: ignore[assignment]
    _worker(sys.argv[1:])
