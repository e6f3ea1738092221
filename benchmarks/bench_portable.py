"""What portability costs: the portable MLP against the same model written natively, per framework.

The model is `numpy_mlp`'s regression MLP (8 -> 32 -> 32 -> 1, tanh, MSE, batch 64,
SGD with momentum 0.9, lr 0.05), the same initial weights everywhere. Per installed
framework, in one process, interleaved round by round (`benchmarks/_timing.py`):

* `native`: the framework's own example, `looproto.examples.<fw>_mlp` (JAX:
  `jax.numpy` and `jax_backend.value_and_grad` on `jax.Array` Variables; TensorFlow:
  `tf.Variable`s, `tf.GradientTape`, a `tf.data` pipeline read in the graph; PyTorch:
  an `nn.Module`, `loss.backward()`, `torch.optim.SGD`). The baseline of the ratios.
* `portable`: `looproto.examples.portable_mlp` on that backend: NumPy Variables lifted
  into the framework per loop, array-API math, the backend's `value_and_grad`,
  `looproto.portable.SGD`, an `ArrayDataset`.
* TensorFlow only, `portable, tf.math ops`: the same, its namespace swapped for plain
  `tf.math` ops while it traces (what `tf.experimental.numpy` might cost).
* PyTorch only, `portable, backward traced`: with `trace_autograd=True` (the portable
  configs' setting), so the backward joins the step's graph.

Every contender is `trainer.train(steps)` of a `StandardTrainer`, `--steps` steps per call
(one inner loop), ending with the loop's own host transfer. The first call (trace and
compile) is timed apart.

    python benchmarks/bench_portable.py [--smoke] [--json PATH] [--steps 100] [--rounds N]
                                        [--frameworks jax,tensorflow,torch]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import _timing
from looproto.module import variable_to_numpy

FRAMEWORKS = ("jax", "tensorflow", "torch")
BASELINE = "native"


def _installed(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    return name != "torch" or importlib.util.find_spec("array_api_compat") is not None


def _train(trainer: Any, steps: int) -> Callable[[], None]:
    def call() -> None:
        trainer.train(steps)

    return call


class _TfMathNamespace:
    """The few array API names the portable MLP uses, as plain `tf.math` ops."""

    def __init__(self) -> None:
        import tensorflow as tf

        self.tanh = tf.tanh
        self.mean = tf.reduce_mean
        self.sum = tf.reduce_sum
        self.abs = tf.abs


def _traced_with_tf_math(trainer: Any, steps: int) -> Callable[[], None]:
    """`_train`, but the first call (which traces) sees `tf.math` ops as the namespace."""
    from looproto.backends import tensorflow as tf_backend

    shim = _TfMathNamespace()
    traced = False

    def call() -> None:
        nonlocal traced
        if traced:
            trainer.train(steps)
            return
        original = tf_backend.array_namespace
        tf_backend.array_namespace = lambda: shim
        try:
            trainer.train(steps)  # traces: the graph holds the tf.math ops from here on
        finally:
            tf_backend.array_namespace = original
        traced = True

    return call


def _traced_backward_class() -> type:
    from looproto.examples import portable_mlp

    class TracedBackwardTrainer(portable_mlp.MLPTrainer):
        def train_step(self, iterator: Any) -> None:
            super().train_step(iterator)

    return TracedBackwardTrainer


def contenders(framework: str, steps: int) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """`{name: call}` for one framework, and `{name: trainer}` to compare results."""
    from looproto.examples import portable_mlp

    native_module = importlib.import_module(f"looproto.examples.{framework}_mlp")
    trainers: dict[str, Any] = {BASELINE: native_module.make_trainer()}
    trainers["portable"] = portable_mlp.make_trainer(framework)
    if framework == "tensorflow":
        trainers["portable, tf.math ops"] = portable_mlp.make_trainer(framework)
    if framework == "torch":
        traced = portable_mlp.make_trainer(framework, backend_options={"trace_autograd": True})
        # Its own code object: Dynamo's cache is per code object and does not guard on
        # its config, so the step of `portable` would be reused, backward untraced.
        traced.__class__ = _traced_backward_class()
        trainers["portable, backward traced"] = traced
    calls: dict[str, Callable[[], None]] = {}
    for name, trainer in trainers.items():
        if name == "portable, tf.math ops":
            calls[name] = _traced_with_tf_math(trainer, steps)
        else:
            calls[name] = _train(trainer, steps)
    return calls, trainers


def run(framework: str, steps: int, rounds: int) -> dict[str, Any]:
    calls, trainers = contenders(framework, steps)
    first_call: dict[str, float] = {}
    for name, call in calls.items():  # The first call: trace + compile + run.
        start = time.perf_counter()
        call()
        first_call[name] = time.perf_counter() - start
    times = _timing.interleaved(calls, rounds=rounds, steps_per_call=steps)
    rows = _timing.summarize(framework, times, baseline=BASELINE)
    # The portable contenders ran the same steps on the same data from the same weights:
    # they must agree (the natives have their own pipelines, so they may not).
    weights = {
        name: variable_to_numpy(trainer.model.layers[0].w)
        for name, trainer in trainers.items()
        if name != BASELINE
    }
    for name, weight in weights.items():
        if not np.allclose(weight, weights["portable"], rtol=1e-3, atol=1e-4):
            raise SystemExit(f"{framework}: {name!r} diverged from 'portable'")
    for row in rows:
        row["first_call_s"] = first_call[row["system"]]
        # The variants against plain `portable`, paired within rounds like every ratio.
        if row["system"] not in (BASELINE, "portable"):
            row["ratio_to_portable"] = _timing.paired_ratio(times, row["system"], "portable")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=100, help="steps per loop (per call)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    args = parser.parse_args(argv)
    wanted = [f for f in args.frameworks.split(",") if f]
    unknown = sorted(set(wanted) - set(FRAMEWORKS))
    if unknown:
        raise SystemExit(f"--frameworks: unknown {unknown}; expected some of {FRAMEWORKS}")
    frameworks = [f for f in wanted if _installed(f)]
    if not frameworks:
        print("bench_portable.py: none of JAX, TensorFlow, PyTorch is installed; nothing to do.")
        return []
    steps, rounds = (3, 2) if args.smoke else (args.steps, args.rounds)
    cache = tempfile.mkdtemp(prefix="bench_portable_inductor_")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)  # cold compile times
    versions: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    try:
        for framework in frameworks:
            versions[framework] = str(importlib.import_module(framework).__version__)
            rows += run(framework, steps, rounds)["rows"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(
        f"{steps} steps per call, {rounds} rounds; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print()
    print(_timing.markdown(rows, "native"))
    print("\nVariants against `portable` (median paired ratio):")
    for row in rows:
        if "ratio_to_portable" in row:
            print(f"  {row['workload']:<10} {row['system']:<26} {row['ratio_to_portable']:.3f}")
    print("\nFirst call (trace + compile + run), seconds (order-dependent: caches warm up):")
    for row in rows:
        print(f"  {row['workload']:<10} {row['system']:<26} {row['first_call_s']:.2f}")
    if args.json:
        _timing.dump(
            args.json,
            {
                "machine": _timing.machine(),
                "versions": versions,
                "steps_per_call": steps,
                "rows": rows,
            },
        )
    return rows


if __name__ == "__main__":
    main()
