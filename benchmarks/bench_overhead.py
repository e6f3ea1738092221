"""The outer loop's cost: `Controller.train` against the bare inner loop, per `steps_per_loop`.

For each backend (each in its own process) the MLP example's trainer
(`looproto.examples.mlp`) runs in two ways, interleaved round by round: `trainer.train(n)`
called once per inner loop, and one `Controller.train` call over as many loops of the
same trainer, which logs, writes summaries every loop and checks its checkpoint
interval. A round covers at least 500 steps. The paired ratio of the two is what the
outer loop costs at that `steps_per_loop`.

    python benchmarks/bench_overhead.py [--smoke] [--json PATH] [--backends numpy,jax,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _timing

SWEEP = (1, 10, 100, 1000)
FRAMEWORKS = {"numpy": "numpy", "jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def measure(backend: str, smoke: bool) -> list[dict[str, Any]]:
    """Runs the sweep for one backend in this process."""
    import logging

    import looproto
    from looproto.examples import mlp
    from looproto.module import variable_to_numpy

    logging.getLogger("looproto").setLevel(logging.WARNING)
    rows: list[dict[str, Any]] = []
    sweep = (1, 10) if smoke else SWEEP
    with tempfile.TemporaryDirectory() as tmp:
        for steps in sweep:
            # One trainer for both ways: two instances of the same TF graph differ by up
            # to ~13% on this machine, which would swamp the outer loop's cost.
            controlled = mlp.trainer(backend)
            checkpoints = looproto.CheckpointManager(
                os.path.join(tmp, f"ckpt{steps}"),
                controlled,
                checkpoint_interval=10**9,  # checked every loop, never due after the first
                step_counter=controlled.global_step,
            )
            controller = looproto.Controller(
                trainer=controlled,
                global_step=controlled.global_step,
                steps_per_loop=steps,
                summary_dir=os.path.join(tmp, f"summaries{steps}"),
                checkpoint_manager=checkpoints,
            )

            # A round is one `train()` call of at least 500 steps (a typical evaluation
            # interval): per-call set-up is paid once, per-loop work once per loop.
            loops = 1 if smoke else max(1, 500 // steps)

            def with_controller(controller: Any = controller, trainer: Any = controlled,
                                steps: int = steps, loops: int = loops) -> None:  # fmt: skip
                target = int(variable_to_numpy(trainer.global_step)) + loops * steps
                controller.train(target, checkpoint_at_completion=False)

            def alone(trainer: Any = controlled, steps: int = steps) -> None:
                trainer.train(steps)

            calls = {"train() alone": _timing.repeated(alone, loops), "Controller": with_controller}
            for call in calls.values():  # warm-up: compile, open event files, first save
                call()
                call()
            # At 1000 steps per loop a round is one call: 24 rounds keep TF's spread below ~10%.
            rounds = 2 if smoke else max(24, 8000 // (loops * steps))
            times = _timing.interleaved(calls, rounds=rounds, steps_per_call=loops * steps)
            controller.close()
            for row in _timing.summarize(f"{backend} spl={steps}", times, "train() alone"):
                row.update(backend=backend, steps_per_loop=steps)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--backends", default=",".join(FRAMEWORKS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # One backend, in this process; rows as JSON on stdout's last line.
        print(json.dumps(measure(args.worker, args.smoke)))
        return []
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        if importlib.util.find_spec(FRAMEWORKS[backend]) is None:
            print(f"{backend}: not installed, skipped")
            continue
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", backend] + (["--smoke"] if args.smoke else [])
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if result.returncode:
            raise SystemExit(f"{backend} failed:\n{result.stderr[-3000:]}")
        rows += json.loads(result.stdout.strip().splitlines()[-1])
    print("| backend | steps_per_loop | train() alone µs/step | Controller µs/step | overhead |")
    print("|---|---|---|---|---|")
    for alone, controller in zip(rows[::2], rows[1::2]):
        print(
            f"| {alone['backend']} | {alone['steps_per_loop']} | {alone['us_per_step']:.1f} | "
            f"{controller['us_per_step']:.1f} | {100 * (controller['ratio'] - 1):+.1f}% |"
        )
    if args.json:
        _timing.dump(args.json, {"machine": _timing.machine(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
