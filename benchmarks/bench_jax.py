"""JAX backend: looproto vs a hand-written `jax.jit` + `lax.scan` loop, in one process.

Workload A: MLP 32->64->64->1, ReLU, MSE, batch 64, SGD.
Workload B: MLP 512->1024->1024->10, ReLU, softmax cross-entropy, batch 256, SGD.

Contenders, interleaved round by round (`benchmarks/_timing.py`), each running
`--steps` steps per call from the same kind of iterator over the same batches:

* `hand-written scan`: one `jax.jit(lax.scan)` call with donated parameters; the
  batches are pulled and stacked on the host, the per-step losses fetched once.
  This is the baseline of every ratio.
* `hand-written scan, data on device`: the same scan over the dataset kept on the
  device (batches picked by index inside the call): no host work but the dispatch.
* `looproto train()`: `StandardTrainer.train(steps)` (default `data="stack"`, the
  default `pipeline_chunks`); `pipeline_chunks=1` (one compiled call per loop, no
  overlap of host and device) and `=4` beside it.
* `looproto Controller`: the same through `Controller.train` with summaries every
  loop, so the outer loop's cost is counted.
* `looproto data=device`: the dataset kept on device, only indices sent.
* `per-step jit loop`: a Python loop over a jitted, donated step (for contrast).
* with flax installed, the same MLP as a Flax NNX model with an `nnx.Optimizer`
  (optax SGD): `nnx.jit + nnx.scan` (hand-written NNX), `split/merge + jit scan`
  (NNX's functional API, state never written back into the objects) and
  `looproto train() (NNX)` (`benchmarks/_nnx_contenders.py`); their ratios to each
  other are reported too.

After timing, every contender has run the same number of steps on the same
batches, so their parameters must agree; the script fails if they do not.

It also reports the first-call time (trace + compile + run) as a function of
`num_steps` for looproto and the hand-written scan, and the host-side cost and
memory of the two data options.

    python benchmarks/bench_jax.py [--smoke] [--json PATH] [--workload A|B|all]
        [--rounds N] [--device cpu|cuda] [--no-first-calls]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["KERAS_BACKEND"] = "jax"  # Keras fit runs in this process, on JAX

import jax
import jax.numpy as jnp
from jax import lax

import looproto
from benchmarks import _keras, _timing, _workloads
from looproto.backends import jax as jax_backend
from looproto.data import ArrayDataset

NUM_BATCHES = 16  # The dataset: this many distinct batches (`_workloads`), cycled.
BASELINE = "hand-written scan"
DEVICE_SCAN = "hand-written scan, data on device"


# -- the shared math ----------------------------------------------------------------


def make_data(workload: _workloads.Workload) -> dict[str, np.ndarray[Any, Any]]:
    """`workload.batches()` as one dataset that an unshuffled `ArrayDataset` replays."""
    xs, ys = zip(*workload.batches(NUM_BATCHES))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def forward(params: list[Any], x: Any) -> Any:
    h = x
    for i in range(0, len(params), 2):
        h = h @ params[i] + params[i + 1]
        if i + 2 < len(params):
            h = jax.nn.relu(h)
    return h


def loss_fn(kind: str) -> Callable[[list[Any], Any, Any], Any]:
    """The workload's loss of `forward`: `"mse"` or `"softmax_xent"`."""

    def mse(params: list[Any], x: Any, y: Any) -> Any:
        return jnp.mean((forward(params, x) - y) ** 2)

    def xent(params: list[Any], x: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(forward(params, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    losses = {"mse": mse, "softmax_xent": xent}
    if kind not in losses:
        raise ValueError(f"unknown loss {kind!r}; expected one of {sorted(losses)}")
    return losses[kind]


def sgd_step(workload: _workloads.Workload) -> Callable[[list[Any], Any], tuple[list[Any], Any]]:
    """The pure step of the hand-written loops."""
    loss, lr = loss_fn(workload.loss), workload.learning_rate

    def step(params: list[Any], batch: Any) -> tuple[list[Any], Any]:
        value, grads = jax.value_and_grad(loss)(params, batch["x"], batch["y"])
        return [p - lr * g for p, g in zip(params, grads)], value

    return step


def stack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


# -- the contenders ---------------------------------------------------------------------


class HandWrittenScan:
    """What a JAX user writes by hand: pull, stack, one jitted scan, one fetch."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        step = sgd_step(workload)

        def loop(params: list[Any], xs: Any) -> tuple[list[Any], Any]:
            return lax.scan(step, params, xs)

        self.run = jax.jit(loop, donate_argnums=0)
        self.params = [jnp.asarray(p) for p in workload.params()]
        self.iterator = iter(ArrayDataset(data, workload.batch, epochs=None))

    def __call__(self, steps: int) -> None:
        xs = stack([next(self.iterator) for _ in range(steps)])
        self.params, losses = self.run(self.params, xs)
        np.asarray(losses)  # One transfer; waits for the call (and so the params).


class HandWrittenDeviceScan:
    """The hand-written scan over batches already on the device: no host work per call
    but the dispatch (the floor the data options are measured against)."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        step = sgd_step(workload)
        shaped = {k: v.reshape(NUM_BATCHES, workload.batch, *v.shape[1:]) for k, v in data.items()}
        batches = jax.device_put(shaped)

        def loop(params: list[Any], offset: Any, steps: int) -> tuple[list[Any], Any]:
            def body(params: list[Any], i: Any) -> tuple[list[Any], Any]:
                return step(params, jax.tree.map(lambda d: d[i % NUM_BATCHES], batches))

            return lax.scan(body, params, offset + jnp.arange(steps))

        self.run = jax.jit(loop, donate_argnums=0, static_argnums=2)
        self.params = [jnp.asarray(p) for p in workload.params()]
        self.offset = 0

    def __call__(self, steps: int) -> None:
        self.params, losses = self.run(self.params, self.offset, steps)
        self.offset = (self.offset + steps) % NUM_BATCHES
        np.asarray(losses)


class PerStepJit:
    """A Python loop over a jitted, donated step."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        self.run = jax.jit(sgd_step(workload), donate_argnums=0)
        self.params = [jnp.asarray(p) for p in workload.params()]
        self.iterator = iter(ArrayDataset(data, workload.batch, epochs=None))

    def __call__(self, steps: int) -> None:
        loss = None
        for _ in range(steps):
            self.params, loss = self.run(self.params, next(self.iterator))
        np.asarray(loss)


class Model(looproto.Module):
    def __init__(self, workload: _workloads.Workload) -> None:
        super().__init__()
        with self.name_scope:
            self.params = [looproto.Variable(jnp.asarray(p)) for p in workload.params()]


class Trainer(looproto.StandardTrainer):
    """The same step, written statefully against looproto Variables."""

    def __init__(
        self,
        workload: _workloads.Workload,
        data: Any,
        data_option: str = "stack",
        pipeline: int | None = None,
    ) -> None:
        options: dict[str, Any] = {"data": data_option}
        if pipeline is not None:
            options["pipeline_chunks"] = pipeline
        super().__init__(
            ArrayDataset(data, workload.batch, epochs=None),
            options=looproto.StandardTrainerOptions(backend="jax", backend_options=options),
        )
        self.model = Model(workload)
        self.global_step = looproto.create_global_step()
        self.loss = looproto.Variable(jnp.float32(0), trainable=False)
        self._loss_fn = loss_fn(workload.loss)
        self._lr = workload.learning_rate

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        params = self.model.params

        def compute() -> Any:
            return self._loss_fn([p.value for p in params], batch["x"], batch["y"])

        loss, grads = jax_backend.value_and_grad(compute, self.model)
        for i, param in enumerate(params):
            param.assign(param.value - self._lr * grads[f"params/{i}"])
        self.loss.assign(loss)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return jax_backend.BACKEND.to_host({"loss": self.loss.value})

    def param_values(self) -> list[np.ndarray[Any, Any]]:
        return [p.numpy() for p in self.model.params]


# -- measurements -----------------------------------------------------------------------


def throughput(
    workload: _workloads.Workload, steps: int, rounds: int, tmp: str, loops: int = 1
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, float]]:
    """Interleaved rounds of every contender: table rows, parameter agreement, and the
    paired ratios of looproto's NNX loop to the hand-written NNX loops (if flax is here)."""
    data = make_data(workload)
    hand, per_step = HandWrittenScan(workload, data), PerStepJit(workload, data)
    on_device = HandWrittenDeviceScan(workload, data)
    trainer = Trainer(workload, data)
    single, four = Trainer(workload, data, pipeline=1), Trainer(workload, data, pipeline=4)
    device_trainer = Trainer(workload, data, data_option="device")
    ctl_trainer = Trainer(workload, data)
    controller = looproto.Controller(
        trainer=ctl_trainer,
        global_step=ctl_trainer.global_step,
        steps_per_loop=steps,
        summary_dir=os.path.join(tmp, workload.title.split()[0], "summaries"),
    )

    def with_controller() -> None:
        target = int(ctl_trainer.global_step) + loops * steps
        controller.train(target, checkpoint_at_completion=False)

    contenders: dict[str, Callable[[], Any]] = {
        BASELINE: lambda: hand(steps),
        DEVICE_SCAN: lambda: on_device(steps),
        "looproto train()": lambda: trainer.train(steps),
        "looproto train() pipeline_chunks=1": lambda: single.train(steps),
        "looproto train() pipeline_chunks=4": lambda: four.train(steps),
        "looproto Controller": with_controller,
        "looproto data=device": lambda: device_trainer.train(steps),
        "per-step jit loop": lambda: per_step(steps),
    }
    nnx_contenders = _nnx_contenders(workload, data)
    for name, runner in nnx_contenders.items():
        contenders[name] = lambda runner=runner: runner(steps)
    if _keras.available():
        for spe in (1, 100):
            contenders[f"keras fit spe={spe}"] = _keras.contender(workload, steps, min(spe, steps))[
                0
            ]
    contenders = {
        name: call if name == "looproto Controller" else _timing.repeated(call, loops)
        for name, call in contenders.items()
    }
    for run in contenders.values():  # Warm-up: compile, open the event file.
        run()
    times = _timing.interleaved(contenders, rounds=rounds, steps_per_call=loops * steps)
    controller.close()

    # Every contender ran (rounds + 1) * loops * steps steps on the same batches.
    reference = [np.asarray(p) for p in hand.params]
    finals = {
        DEVICE_SCAN: [np.asarray(p) for p in on_device.params],
        "looproto train()": trainer.param_values(),
        "looproto train() pipeline_chunks=1": single.param_values(),
        "looproto train() pipeline_chunks=4": four.param_values(),
        "looproto Controller": ctl_trainer.param_values(),
        "looproto data=device": device_trainer.param_values(),
        "per-step jit loop": [np.asarray(p) for p in per_step.params],
        **{name: runner.param_values() for name, runner in nnx_contenders.items()},
    }
    agreement = {
        name: max(float(np.max(np.abs(a - b))) for a, b in zip(values, reference))
        for name, values in finals.items()
    }
    # Relative to the largest parameter; `main` fails the run (after printing the
    # tables) if any contender diverged.
    scale = max(float(np.max(np.abs(p))) for p in reference)
    agreement = {name: diff / scale for name, diff in agreement.items()}
    nnx_ratios = {  # looproto's NNX loop against the hand-written NNX loops, paired
        other: _timing.paired_ratio(times, NNX_LOOPROTO, other)
        for other in (NNX_JIT, NNX_SPLIT)
        if nnx_contenders
    }
    return _timing.summarize(workload.title, times, baseline=BASELINE), agreement, nnx_ratios


NNX_JIT, NNX_SPLIT, NNX_LOOPROTO = (
    "nnx.jit + nnx.scan",
    "NNX split/merge + jit scan",
    "looproto train() (NNX)",
)


def _nnx_contenders(workload: _workloads.Workload, data: Any) -> dict[str, Any]:
    """The Flax NNX contenders, if flax is installed."""
    try:
        from benchmarks import _nnx_contenders as nnx_bench
    except ImportError:
        return {}
    trainer = nnx_bench.NnxTrainer(workload, data)
    return {
        NNX_JIT: nnx_bench.NnxJitScan(workload, data),
        NNX_SPLIT: nnx_bench.SplitMergeScan(workload, data),
        NNX_LOOPROTO: _Runner(trainer),
    }


class _Runner:
    """`trainer.train(steps)`, with the trainer's `param_values`."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def __call__(self, steps: int) -> Any:
        return self.trainer.train(steps)

    def param_values(self) -> list[np.ndarray[Any, Any]]:
        values: list[np.ndarray[Any, Any]] = self.trainer.param_values()
        return values


_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}


def first_calls(
    workload: _workloads.Workload, step_counts: list[int], reps: int
) -> list[dict[str, Any]]:
    """First-call time (trace + compile + run) per `num_steps`, looproto and hand-written.

    Each measurement uses a fresh jitted function. Besides the wall time of the
    first call, JAX's own monitoring events give how much of it was tracing,
    lowering and XLA compilation, so the table does not depend on subtracting a
    (noisy) run time. The two systems alternate; the median of `reps` repetitions
    is kept (one for 1000 steps).
    """
    data = make_data(workload)
    systems = (BASELINE, "looproto train()")
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    events: dict[str, float] = {}

    def listener(event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            events[_COMPILE_EVENTS[event]] = events.get(_COMPILE_EVENTS[event], 0.0) + duration

    HandWrittenScan(workload, data)(1)  # Process-wide first-use costs, not counted.
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for n in step_counts:
            for _ in range(reps if n < 1000 else 1):
                for system in systems:
                    runner: Callable[[int], Any]
                    if system == BASELINE:
                        runner = HandWrittenScan(workload, data)
                    else:
                        runner = Trainer(workload, data).train
                    events.clear()
                    start = time.perf_counter()
                    runner(n)
                    sample = {"first_call_s": time.perf_counter() - start}
                    sample.update({key: events.get(key, 0.0) for key in _COMPILE_EVENTS.values()})
                    samples.setdefault((system, n), []).append(sample)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    rows = []
    for system in systems:
        for n in step_counts:
            got = samples[(system, n)]
            row: dict[str, Any] = {"workload": workload.title, "system": system, "num_steps": n}
            for key in ("first_call_s", *_COMPILE_EVENTS.values()):
                row[key] = statistics.median(sample[key] for sample in got)
            row["reps"] = len(got)
            rows.append(row)
    return rows


def data_options(workload: _workloads.Workload, steps: int) -> dict[str, Any]:
    """What `data="stack"` costs on the host per call, and what `"device"` keeps resident."""
    data = make_data(workload)
    iterator = iter(ArrayDataset(data, workload.batch, epochs=None))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        stacked = stack([next(iterator) for _ in range(steps)])
        jax.device_put(stacked["x"]).block_until_ready()
        samples.append(time.perf_counter() - start)
    return {
        "workload": workload.title,
        "steps_per_call": steps,
        "stack_host_ms_per_call": 1e3 * statistics.median(samples),
        "stack_bytes_per_call": int(sum(a.nbytes for a in stacked.values())),
        "device_resident_bytes": int(sum(a.nbytes for a in data.values())),
        "device_index_bytes_per_call": steps * workload.batch * 4,
    }


def compile_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | system | num_steps | first call (s) | trace (s) | lower (s) | "
        "XLA compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['num_steps']} | {r['first_call_s']:.3f} | "
            f"{r['trace_s']:.4f} | {r['lower_s']:.4f} | {r['compile_s']:.3f} |"
        )
    return "\n".join(lines)


def data_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | steps/call | stack: host ms/call | stack: MB sent/call | "
        "device: MB resident | device: KB sent/call |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['steps_per_call']} | {r['stack_host_ms_per_call']:.2f} | "
            f"{r['stack_bytes_per_call'] / 2**20:.1f} | {r['device_resident_bytes'] / 2**20:.1f} | "
            f"{r['device_index_bytes_per_call'] / 2**10:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--workload", choices=("A", "B", "all"), default="all")
    parser.add_argument("--steps", type=int, default=100, help="steps per call")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--device",
        default=None,
        help="JAX platform to run on (cpu, cuda); default: JAX's own choice",
    )
    parser.add_argument(
        "--no-first-calls", action="store_true", help="skip the first-call (compile) table"
    )
    args = parser.parse_args(argv)
    if args.device:
        jax.config.update("jax_platforms", args.device)  # Before any array is made.
    names = ["A", "B"] if args.workload == "all" else [args.workload]
    if args.smoke:
        steps, counts, reps = 3, {"A": [1, 3], "B": []}, {"A": 1, "B": 1}
        rounds = {"A": 2, "B": 1}
    else:
        # B (~15-25 ms a step on a 2-core CPU, ~1.5-2.5 s a call) kept under ~2 minutes.
        steps, counts = args.steps, {"A": [1, 10, 100, 1000], "B": [1, 10, 100]}
        rounds, reps = {"A": 30, "B": 4}, {"A": 3, "B": 1}
    if args.rounds is not None:
        rounds = dict.fromkeys(rounds, args.rounds)

    rows: list[dict[str, Any]] = []
    compile_rows: list[dict[str, Any]] = []
    data_rows: list[dict[str, Any]] = []
    agreement: dict[str, Any] = {}
    nnx_ratios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            workload = {"A": _workloads.A, "B": _workloads.B}[name]
            # First calls before anything else is compiled in this process.
            if not args.no_first_calls:
                compile_rows += first_calls(workload, counts[name], reps[name])
            loops = 1 if args.smoke else _timing.LOOPS_PER_ROUND[name]
            table, agreement[name], nnx_ratios[name] = throughput(
                workload, steps, rounds[name], tmp, loops
            )
            rows += table
            data_rows.append(data_options(workload, steps))
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {steps} steps per call\n")
    print(_timing.markdown(rows, BASELINE))
    print(
        "\nMax |param difference| to the hand-written scan after the timed runs, relative "
        "to the largest parameter:",
        agreement,
    )
    for name, ratios in nnx_ratios.items():
        for other, ratio in ratios.items():
            print(f"{name}: {NNX_LOOPROTO} / {other} = {ratio:.3f} (paired median)")
    if compile_rows:
        print("\n" + compile_markdown(compile_rows))
    print("\n" + data_markdown(data_rows))
    payload = {
        "machine": _timing.machine(),
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "steps_per_call": steps,
        "rows": rows,
        "param_agreement": agreement,
        "nnx_ratios": nnx_ratios,
        "first_calls": compile_rows,
        "data_options": data_rows,
    }
    if args.json:
        _timing.dump(args.json, payload)
    # Exact on CPU (0.0); a GPU's TF32-class matmuls may round differently per contender.
    tolerance = 1e-4 if jax.default_backend() == "cpu" else 1e-2
    diverged = [
        f"{workload}: {name} by {diff:.2g}"
        for workload, diffs in agreement.items()
        for name, diff in diffs.items()
        if diff > tolerance
    ]
    if diverged:
        raise SystemExit(f"Diverged from {BASELINE} (tolerance {tolerance}): {diverged}")
    return payload


if __name__ == "__main__":
    main()
