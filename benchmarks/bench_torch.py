"""PyTorch backend: looproto against hand-written torch loops, Keras and Lightning, in one process.

Contenders, per workload, with the same initial weights and batches:

* `hand eager` / `hand compiled`: `for` over the batches: forward, `backward()`,
  `opt.step()`, `opt.zero_grad()` (the step under `torch.compile` for the second);
  one `float(loss)` per loop. The faster of the two is the baseline of every ratio.
* `looproto train()` / `looproto compiled`: `StandardTrainer.train(n)` of a trainer whose
  `train_step` runs the same ops plus looproto's bookkeeping (`global_step.assign_add(1)`,
  keeping the last loss), eager and with the default `torch.compile`;
* `looproto Controller`: the faster looproto loop through `Controller.train`, with
  summaries every loop, so the outer loop's cost is counted;
* Keras 3 `model.fit` on the torch backend (`steps_per_execution` must be 1 there), and
  PyTorch Lightning `Trainer.fit` (no logger, checkpointing or progress bar): their
  steady state, timed by a callback (see `benchmarks/_keras.py`).

Compile time (the first loop of each compiled contender) is reported separately.

    python benchmarks/bench_torch.py [--smoke] [--json PATH] [--steps 100] [--threads N]
        [--device cuda] [--mode reduce-overhead] [--workload A|B|all] [--no-keras]
"""

from __future__ import annotations

import argparse
import importlib.util
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

os.environ["KERAS_BACKEND"] = "torch"  # Keras fit runs in this process, on PyTorch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import looproto
from benchmarks import _keras, _timing, _workloads

DEVICE = torch.device("cpu")  # `--device`: the model, optimizer state and batches live here.
MODE: str | None = None  # `--mode`: the `torch.compile` mode of the compiled contenders.

_LOSSES = {"mse": torch.nn.functional.mse_loss, "softmax_xent": torch.nn.functional.cross_entropy}


def make_model(workload: _workloads.Workload) -> torch.nn.Sequential:
    """The workload's MLP with the shared initial weights (`Linear` keeps w transposed)."""
    layers: list[torch.nn.Module] = []
    params = workload.params()
    for i, (n_in, n_out) in enumerate(itertools.pairwise(workload.sizes)):
        linear = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[2 * i].T.copy()))
            linear.bias.copy_(torch.from_numpy(params[2 * i + 1]))
        layers.append(linear)
        if i < len(workload.sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(DEVICE)


def make_batches(workload: _workloads.Workload) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            torch.from_numpy(x).to(DEVICE),
            torch.from_numpy(y.astype(np.int64) if y.dtype == np.int32 else y).to(DEVICE),
        )
        for x, y in workload.batches()
    ]


def make_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The hand-written loops' step."""
    loss_fn = _LOSSES[loss]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss_fn(model(x), y)
        value.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        return value.detach()

    return step


class _Cycle:
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return itertools.cycle(self.batches)


class Trainer(looproto.StandardTrainer):
    """The benchmark's step written as a looproto user writes it: the same ops, inline."""

    def __init__(self, workload: _workloads.Workload, batches: list[Any], compiled: bool) -> None:
        options = looproto.StandardTrainerOptions(
            use_compiled_step=compiled,
            use_compiled_loop=compiled,
            backend="torch",
            backend_options={"mode": MODE} if compiled and MODE else {},
        )
        super().__init__(train_dataset=_Cycle(batches), options=options)
        self.model = make_model(workload)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=workload.learning_rate)
        self.global_step = looproto.create_global_step()
        self.loss = looproto.Variable(np.float32(0), trainable=False)
        self.loss_fn = _LOSSES[workload.loss]

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        loss = self.loss_fn(self.model(x), y)
        # looproto's bookkeeping before `backward()`: compiled, it joins the forward graph
        # instead of adding a graph after the optimizer's graph breaks.
        self.loss.assign(loss.detach())
        self.global_step.assign_add(1)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss.numpy()}


def hand_written(
    workload: _workloads.Workload, batches: list[Any], steps: int, compiled: bool
) -> Callable[[], None]:
    """`steps` steps of the hand-written loop per call."""
    model = make_model(workload)
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.learning_rate)
    step = make_step(model, optimizer, workload.loss)
    if compiled:
        step = torch.compile(step, mode=MODE)
    data = itertools.cycle(batches)
    mark = MODE == "reduce-overhead"  # CUDA graphs: one replay per step, marked.

    def hand() -> None:
        loss = None
        for _ in range(steps):
            x, y = next(data)
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            loss = step(x, y)
        float(loss)  # type: ignore[arg-type]

    return hand


def lightning_contender(
    workload: _workloads.Workload, batches: list[Any], steps: int
) -> Callable[[], float] | None:
    """Lightning `Trainer.fit` for `2 * steps` steps; returns the second half's time."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        return None
    import logging
    import warnings

    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")  # its own deprecations
    loss_fn = _LOSSES[workload.loss]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(workload)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self.net(x), y)  # type: ignore[no-any-return]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=workload.learning_rate)

    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    module = Module()
    # batch_size=None: each element already is a batch, passed through as it is.
    loader = torch.utils.data.DataLoader(
        [batches[i % len(batches)] for i in range(2 * steps)], batch_size=None
    )

    def steady() -> float:
        stamps.clear()
        trainer = pl.Trainer(
            max_steps=2 * steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="gpu" if DEVICE.type == "cuda" else "cpu",
            devices=1,
            callbacks=[Stamp()],
        )
        trainer.fit(module, train_dataloaders=loader)
        return stamps[-1] - stamps[steps - 1]

    return steady


def run_workload(
    workload: _workloads.Workload, steps: int, rounds: int, tmp: str, loops: int = 1
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    batches = make_batches(workload)
    trainers = {
        "eager": Trainer(workload, batches, False),
        "compiled": Trainer(workload, batches, True),
    }
    contenders: dict[str, Callable[[], Any]] = {
        "hand eager": hand_written(workload, batches, steps, False),
        "hand compiled": hand_written(workload, batches, steps, True),
        "looproto train()": lambda: trainers["eager"].train(steps),
        "looproto compiled": lambda: trainers["compiled"].train(steps),
    }
    # Build every contender before any runs: importing Keras loads more of looproto's
    # backends, which changes what compiled steps guard on (one recompile, not timed).
    if _keras.available():
        for spe in (1,):  # Keras 3.15 on torch: "`steps_per_execution` must be 1"
            contenders[f"keras fit spe={spe}"] = _keras.contender(workload, steps, min(spe, steps))[
                0
            ]
    lightning = lightning_contender(workload, batches, steps)
    if lightning is not None:
        contenders["lightning fit"] = lightning
    first_call: dict[str, float] = {}
    for name, call in contenders.items():  # Warm-up and compilation, timed apart.
        first_call[name] = _timing_once(call)
    for call in contenders.values():  # A second warm-up: any recompile happens here.
        call()
    # The Controller drives the faster of looproto's two loops (on this CPU: eager for A).
    mode = min(("eager", "compiled"), key=lambda m: _timing_once(contenders[_LOOPS[m]]))
    controlled = Trainer(workload, batches, mode == "compiled")
    controller = looproto.Controller(
        trainer=controlled,
        global_step=controlled.global_step,
        steps_per_loop=steps,
        summary_dir=os.path.join(tmp, workload.name),
    )
    for _ in range(2):
        controller.train(int(controlled.global_step) + steps, checkpoint_at_completion=False)
    contenders = {name: _timing.repeated(call, loops) for name, call in contenders.items()}
    contenders["looproto Controller"] = lambda: controller.train(
        int(controlled.global_step) + loops * steps, checkpoint_at_completion=False
    )
    times = _timing.interleaved(contenders, rounds=rounds, steps_per_call=loops * steps)
    controller.close()
    fastest = min(("hand eager", "hand compiled"), key=lambda k: statistics.median(times[k]))
    rows = _timing.summarize(workload.title, times, baseline=fastest)
    for row in rows:
        row["baseline"] = fastest
        if row["system"] == "looproto Controller":
            row["system"] = f"looproto Controller ({mode})"
    return rows, first_call


_LOOPS = {"eager": "looproto train()", "compiled": "looproto compiled"}


def _timing_once(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=100, help="steps per loop")
    parser.add_argument("--rounds", type=int, default=None, help="default: per workload")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help='where everything runs ("cuda")')
    parser.add_argument("--mode", default=None, help='compile mode ("reduce-overhead")')
    parser.add_argument(
        "--workload", choices=("A", "B", "all"), default="all", help="which workload(s)"
    )
    parser.add_argument("--no-keras", action="store_true", help="leave Keras fit out")
    args = parser.parse_args(argv)
    global DEVICE, MODE
    DEVICE, MODE = torch.device(args.device), args.mode
    if args.no_keras:
        _keras.available = lambda: False  # type: ignore[assignment]
    if args.threads:
        torch.set_num_threads(args.threads)
    # A fresh inductor cache: compile times are cold, as on a user's first run.
    cache = tempfile.mkdtemp(prefix="bench_torch_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    steps = 3 if args.smoke else args.steps
    workloads = [w for w in _workloads.WORKLOADS if args.workload in ("all", w.name)]
    rows: list[dict[str, Any]] = []
    compile_times: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workload in workloads:
                rounds = args.rounds or (2 if args.smoke else (30 if workload.name == "A" else 12))
                loops = 1 if args.smoke else _timing.LOOPS_PER_ROUND[workload.name]
                workload_rows, first = run_workload(workload, steps, rounds, tmp, loops)
                rows += workload_rows
                compile_times[workload.title] = first
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(
        f"PyTorch {torch.__version__} on {DEVICE}, mode {MODE}, {torch.get_num_threads()} "
        f"threads, {steps} steps per call\n"
    )
    for workload in workloads:
        subset = [r for r in rows if r["workload"] == workload.title]
        print(_timing.markdown(subset, f"faster hand-written ({subset[0]['baseline']})"))
        print()
    print("First call (compile + run), seconds:")
    for title, times in compile_times.items():
        print(f"  {title}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    if args.json:
        _timing.dump(
            args.json,
            {"machine": _timing.machine(), "torch": torch.__version__,
             "device": str(DEVICE), "mode": MODE,
             "threads": torch.get_num_threads(), "rows": rows, "first_call_s": compile_times,
             "steps_per_call": steps},
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
