"""PyTorch backend: looproto (Controller + StandardTrainer) vs hand-written torch loops.

Workload A: MLP 32->64->64->1, MSE, batch 64, SGD.
Workload B: MLP 512->1024->1024->10, softmax cross-entropy, batch 256, SGD.

Contenders, per workload, in one process, with the same initial weights and batches:

* `hand eager`: `for` over the batches: forward, `backward()`, `opt.step()`,
  `opt.zero_grad()`; one `float(loss)` per loop (what a log line costs);
* `hand compiled`: the same step function under `torch.compile` (inductor);
* `looproto eager`: a `StandardTrainer` whose `train_step` runs the same ops (plus
  looproto's bookkeeping: `global_step.assign_add(1)` and keeping the last loss),
  `use_compiled_step=False`, driven by a `Controller` (no summaries);
* `looproto compiled`: the same trainer with the default options (`torch.compile`);
* `step-only eager` / `step-only compiled`: `trainer.train(steps)` of a trainer
  whose step has no bookkeeping, i.e. what the torch loop itself adds.

Each round runs every contender for `--steps` steps (rotating order); the tables
report median us/step and the median *paired* ratio to the faster hand-written
loop of that workload (and of each looproto loop to its own hand-written twin).
Compile time (the first loop of each compiled contender) is reported separately.

    python benchmarks/bench_torch.py [--smoke] [--json PATH] [--workloads A,B]
                                     [--steps 100] [--rounds N] [--threads N] [--warm-cache]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import torch
except ImportError:
    sys.exit("bench_torch.py needs PyTorch: pip install 'looproto[torch]'")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looproto
from benchmarks import _timing

WORKLOADS: dict[str, dict[str, Any]] = {
    "A": {"sizes": [32, 64, 64, 1], "batch": 64, "loss": "mse", "rounds": 30},
    "B": {"sizes": [512, 1024, 1024, 10], "batch": 256, "loss": "xent", "rounds": 10},
}
LR = 0.01


def make_model(sizes: list[int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def make_batches(spec: dict[str, Any], count: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    n_in, n_out, batch = spec["sizes"][0], spec["sizes"][-1], spec["batch"]
    batches = []
    for _ in range(count):
        x = torch.from_numpy(rng.normal(size=(batch, n_in)).astype(np.float32))
        if spec["loss"] == "mse":
            y = torch.from_numpy(rng.normal(size=(batch, n_out)).astype(np.float32))
        else:
            y = torch.from_numpy(rng.integers(0, n_out, size=batch))
        batches.append((x, y))
    return batches


_LOSSES = {"mse": torch.nn.functional.mse_loss, "xent": torch.nn.functional.cross_entropy}


def make_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The hand-written loops' step."""
    loss_fn = _LOSSES[loss]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss_fn(model(x), y)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.detach()

    return step


class Trainer(looproto.StandardTrainer):
    """The benchmark's step written as a looproto user writes it: the same ops, inline."""

    def __init__(self, spec: dict[str, Any], batches: list[Any], compiled: bool) -> None:
        options = looproto.StandardTrainerOptions(
            use_compiled_step=compiled, use_compiled_loop=compiled
        )
        super().__init__(train_dataset=_Cycle(batches), options=options)
        self.model = make_model(spec["sizes"])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.global_step = looproto.create_global_step()
        self.loss = looproto.Variable(np.float32(0), trainable=False)
        self.loss_fn = _LOSSES[spec["loss"]]

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        loss = self.loss_fn(self.model(x), y)
        # looproto's bookkeeping (the Controller's step counter, the loop's output)
        # before `backward()`: compiled, it joins the forward graph instead of adding
        # a graph after the optimizer's graph breaks.
        self.loss.assign(loss.detach())
        self.global_step.assign_add(1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss.numpy()}


class StepOnlyTrainer(Trainer):
    """The same step without looproto's bookkeeping: what the loop itself costs."""

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class _Cycle:
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return itertools.cycle(self.batches)


def hand_written(
    spec: dict[str, Any], batches: list[Any], steps: int, compiled: bool
) -> Callable[[], None]:
    """`steps` steps of the hand-written loop per call."""
    model = make_model(spec["sizes"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step = make_step(model, optimizer, spec["loss"])
    if compiled:
        step = torch.compile(step)
    data = itertools.cycle(batches)

    def hand() -> None:
        loss = None
        for _ in range(steps):
            x, y = next(data)
            loss = step(x, y)
        float(loss)  # type: ignore[arg-type]

    return hand


def with_looproto(
    spec: dict[str, Any], batches: list[Any], steps: int, compiled: bool
) -> Callable[[], None]:
    """One inner loop of `steps` steps per call, through the `Controller`."""
    trainer = Trainer(spec, batches, compiled)
    controller = looproto.Controller(
        trainer=trainer, global_step=trainer.global_step, steps_per_loop=steps
    )

    def run() -> None:
        controller.train(int(trainer.global_step) + steps, checkpoint_at_completion=False)

    return run


def step_only(
    spec: dict[str, Any], batches: list[Any], steps: int, compiled: bool
) -> Callable[[], None]:
    """`trainer.train(steps)` of `StepOnlyTrainer` (no Controller: it wants a global step)."""
    trainer = StepOnlyTrainer(spec, batches, compiled)

    def run() -> None:
        trainer.train(steps)

    return run


def run_workload(name: str, spec: dict[str, Any], steps: int, rounds: int) -> dict[str, Any]:
    batches = make_batches(spec)
    contenders: dict[str, Callable[[], None]] = {}
    first_loop_s: dict[str, float] = {}
    # The first call of each contender is its warm-up (and compilation): timed apart.
    # looproto compiles before the hand-written loop does, so the hand-written loop's
    # compile time profits from kernels inductor already built in this process.
    for label, make, compiled in [
        ("hand eager", hand_written, False),
        ("looproto eager", with_looproto, False),
        ("looproto compiled", with_looproto, True),
        ("hand compiled", hand_written, True),
        ("step-only eager", step_only, False),
        ("step-only compiled", step_only, True),
    ]:
        contender = make(spec, batches, steps, compiled)
        start = time.perf_counter()
        contender()
        first_loop_s[label] = time.perf_counter() - start
        contenders[label] = contender
    times = _timing.interleaved(contenders, rounds=rounds, steps_per_call=steps)
    fastest = min(("hand eager", "hand compiled"), key=lambda k: statistics.median(times[k]))
    title = f"{name} {'-'.join(map(str, spec['sizes']))}"
    rows = _timing.summarize(title, times, baseline=fastest)
    for row in rows:
        twin = row["system"].replace("looproto", "hand").replace("step-only", "hand")
        row["ratio_to_twin"] = _timing.paired_ratio(times, row["system"], twin)
        row["first_loop_s"] = first_loop_s[row["system"]]
    return {"rows": rows, "fastest_hand": fastest}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--workloads", default="A,B")
    parser.add_argument("--steps", type=int, default=100, help="steps per loop")
    parser.add_argument("--rounds", type=int, default=None, help="default: per workload")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="use inductor's on-disk cache (default: a fresh one, so compile times are cold)",
    )
    args = parser.parse_args(argv)
    cold_cache = None
    if not args.warm_cache:
        cold_cache = tempfile.mkdtemp(prefix="bench_torch_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache
    try:
        return _run(args)
    finally:
        if cold_cache is not None:
            shutil.rmtree(cold_cache, ignore_errors=True)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    all_rows: list[dict[str, Any]] = []
    for name in args.workloads.split(","):
        spec = WORKLOADS[name]
        steps = 3 if args.smoke else args.steps
        rounds = 2 if args.smoke else (args.rounds or spec["rounds"])
        result = run_workload(name, spec, steps, rounds)
        rows = result["rows"]
        print(_timing.markdown(rows, f"faster hand-written ({result['fastest_hand']})"))
        print()
        for row in rows:
            print(
                f"  {row['system']:<18} ratio to its hand-written twin {row['ratio_to_twin']:.3f}; "
                f"first loop (incl. compile) {row['first_loop_s']:.1f} s"
            )
        print()
        all_rows.extend(rows)
    if args.json:
        payload = {
            "machine": _timing.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": all_rows,
        }
        _timing.dump(args.json, payload)
    return all_rows


if __name__ == "__main__":
    main()
