"""TensorFlow backend: looproto against hand-written `tf.function` loops, in one process.

Contenders, all running the very same step function on the same `tf.data` pipeline:

* `hand-written tf.range`: one `tf.function` whose body is `for _ in tf.range(n)`,
  pulling batches in the graph (the best hand-written TensorFlow loop; the baseline);
* `hand-written tf.range, 2nd copy`: the same loop built again, as a control: on
  workload A two identical graphs differ by up to ~13% here, the noise floor of every
  TensorFlow ratio on it.
* `looproto train()`: `StandardTrainer.train(n)` on the TensorFlow backend;
* `looproto Controller`: `Controller.train` with summaries every loop, so the outer
  loop's cost is counted;
* Keras 3 `model.fit` with `steps_per_execution` 1 and 100 (steady state, timed by a
  callback; the set-up of each `fit` call is reported apart);
* `per-step tf.function` and `eager`, for contrast.

    python benchmarks/bench_tensorflow.py [--smoke] [--json PATH] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"  # Keras fit runs in this process, on TensorFlow
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf

import looproto
from benchmarks import _keras, _timing, _workloads


def make_step(workload: _workloads.Workload, params: list[tf.Variable]) -> Callable[..., Any]:
    """One SGD step on `params`, returning the loss (traced by every compiled contender)."""
    n_layers = len(params) // 2
    lr = workload.learning_rate

    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            h = x
            for i in range(n_layers):
                h = h @ params[2 * i] + params[2 * i + 1]
                if i < n_layers - 1:
                    h = tf.nn.relu(h)
            if workload.loss == "mse":
                loss = tf.reduce_mean((h - y) ** 2)
            else:
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=h)
                )
        for param, grad in zip(params, tape.gradient(loss, params)):
            param.assign_sub(lr * grad)
        return loss

    return step


def dataset(workload: _workloads.Workload) -> tf.data.Dataset:
    xs, ys = zip(*workload.batches())
    return tf.data.Dataset.from_tensor_slices((list(xs), list(ys))).repeat()


class Trainer(looproto.StandardTrainer):
    def __init__(self, workload: _workloads.Workload) -> None:
        super().__init__(train_dataset=dataset(workload))
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.params = [tf.Variable(p) for p in workload.params()]
        self.loss = tf.Variable(0.0, trainable=False)
        self._step = make_step(workload, self.params)

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        self.loss.assign(self._step(x, y))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss}


def hand_written_loop(workload: _workloads.Workload, steps: int) -> Callable[[], None]:
    """The baseline: one `tf.function` whose `tf.range` loop pulls `steps` batches."""
    hand_params = [tf.Variable(p) for p in workload.params()]
    hand_step = make_step(workload, hand_params)
    hand_loss = tf.Variable(0.0, trainable=False)
    hand_iter = iter(dataset(workload))

    @tf.function
    def hand_loop(iterator: Any, n: Any) -> None:
        for _ in tf.range(n):
            x, y = next(iterator)
            hand_loss.assign(hand_step(x, y))

    n_tensor = tf.constant(steps, tf.int64)

    def hand_written() -> None:
        hand_loop(hand_iter, n_tensor)
        hand_loss.numpy()

    return hand_written


def contenders(workload: _workloads.Workload, steps: int, tmp: str, loops: int) -> dict[str, Any]:
    """`{name: zero-argument call running `steps` steps}`, each finishing with a host read."""
    step_params = [tf.Variable(p) for p in workload.params()]
    step_fn = tf.function(make_step(workload, step_params))
    step_iter = iter(dataset(workload))

    def per_step() -> None:
        for _ in range(steps):
            loss = step_fn(*next(step_iter))
        loss.numpy()

    eager_params = [tf.Variable(p) for p in workload.params()]
    eager_step = make_step(workload, eager_params)
    eager_iter = iter(dataset(workload))

    def eager() -> None:
        for _ in range(steps):
            loss = eager_step(*next(eager_iter))
        loss.numpy()

    trainer = Trainer(workload)

    def looproto_train() -> None:
        trainer.train(steps)
        trainer.loss.numpy()

    controlled = Trainer(workload)
    controller = looproto.Controller(
        trainer=controlled,
        global_step=controlled.global_step,
        steps_per_loop=steps,
        summary_dir=os.path.join(tmp, workload.name),
    )

    def looproto_controller() -> None:
        target = int(controlled.global_step.numpy()) + loops * steps
        controller.train(target, checkpoint_at_completion=False)

    calls = {
        "hand-written tf.range": hand_written_loop(workload, steps),
        # The same graph built twice: how far two identical instances drift apart here.
        "hand-written tf.range, 2nd copy": hand_written_loop(workload, steps),
        "looproto train()": looproto_train,
        "looproto Controller": looproto_controller,
    }
    if _keras.available():
        for spe in (1, 100):
            steady, _ = _keras.contender(workload, steps, min(spe, steps))
            calls[f"keras fit spe={spe}"] = steady
    calls["per-step tf.function"] = per_step
    calls["eager"] = eager
    return {
        name: call if name == "looproto Controller" else _timing.repeated(call, loops)
        for name, call in calls.items()
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=100, help="steps per loop")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    steps = 3 if args.smoke else args.steps
    rows: list[dict[str, Any]] = []
    compile_times: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in _workloads.WORKLOADS:
            loops = 1 if args.smoke else _timing.LOOPS_PER_ROUND[workload.name]
            calls = contenders(workload, steps, tmp, loops)
            compile_times[workload.title] = {}
            for name, call in calls.items():  # First call: trace + compile + run.
                start = time.perf_counter()
                call()
                compile_times[workload.title][name] = time.perf_counter() - start
            rounds = args.rounds or (2 if args.smoke else (30 if workload.name == "A" else 15))
            if workload.name == "B" and not args.smoke:
                calls.pop("eager")  # ~12 ms a step: adds minutes, says nothing new
            times = _timing.interleaved(calls, rounds=rounds, steps_per_call=loops * steps)
            rows += _timing.summarize(workload.title, times, baseline="hand-written tf.range")
    print(f"TensorFlow {tf.__version__}, {steps} steps per call\n")
    print(_timing.markdown(rows, "hand-written tf.range"))
    print("\nFirst call (trace + compile + run), seconds:")
    for title, times in compile_times.items():
        print(f"  {title}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    if args.json:
        _timing.dump(
            args.json,
            {
                "machine": _timing.machine(),
                "tensorflow": tf.__version__,
                "rows": rows,
                "first_call_s": compile_times,
                "steps_per_call": steps,
            },
        )
    return rows


if __name__ == "__main__":
    main()
