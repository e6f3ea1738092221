"""NumPy backend: looproto (StandardTrainer, Controller) against a hand-written NumPy loop.

Both sides run the very same step function (hand-written backprop and SGD, in place)
on the same batches; looproto adds the StandardTrainer hooks and, for the Controller
contender, the outer loop (logging, summaries every loop).

    python benchmarks/bench_numpy.py [--smoke] [--json PATH] [--steps N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looproto
from benchmarks import _timing, _workloads


def sgd_step(
    workload: _workloads.Workload, params: list[np.ndarray[Any, Any]], x: Any, y: Any
) -> float:
    """One SGD step of the workload's MLP (ReLU), in place; returns the loss."""
    acts = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    if workload.loss == "mse":
        diff = h - y
        loss = float(np.mean(diff**2))
        delta = 2 * diff / diff.size
    else:
        shifted = h - h.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(-np.mean(np.log(probs[rows, y])))
        delta = probs
        delta[rows, y] -= 1
        delta /= len(y)
    for i in reversed(range(n_layers)):
        gw, gb = acts[i].T @ delta, delta.sum(0)
        if i:
            delta = (delta @ params[2 * i].T) * (acts[i] > 0)
        params[2 * i] -= workload.learning_rate * gw
        params[2 * i + 1] -= workload.learning_rate * gb
    return loss


class _Cycle:
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return itertools.cycle(self.batches)


class Trainer(looproto.StandardTrainer):
    def __init__(self, workload: _workloads.Workload, batches: list[Any]) -> None:
        super().__init__(train_dataset=_Cycle(batches))
        self.workload = workload
        self.global_step = looproto.create_global_step()
        self.params = [looproto.Variable(p) for p in workload.params()]
        self.loss = looproto.Variable(np.float32(0), trainable=False)

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        # Update the arrays in place, exactly as the hand-written loop does.
        self.loss.assign(sgd_step(self.workload, [p.value for p in self.params], x, y))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss.numpy()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=100, help="steps per loop")
    args = parser.parse_args(argv)
    steps = 3 if args.smoke else args.steps
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in _workloads.WORKLOADS:
            rounds = 2 if args.smoke else (30 if workload.name == "A" else 10)
            batches = workload.batches()
            hand_params = workload.params()
            hand_iter = itertools.cycle(batches)

            def hand_written(params: Any = hand_params, data: Any = hand_iter,
                             workload: Any = workload) -> None:  # fmt: skip
                for _ in range(steps):
                    x, y = next(data)
                    sgd_step(workload, params, x, y)

            trainer = Trainer(workload, batches)
            controlled = Trainer(workload, batches)
            controller = looproto.Controller(
                trainer=controlled,
                global_step=controlled.global_step,
                steps_per_loop=steps,
                summary_dir=os.path.join(tmp, workload.name),
            )
            controller.train(steps)  # warm-up: imports tensorboardX, opens the event file

            loops = 1 if args.smoke else _timing.LOOPS_PER_ROUND[workload.name]

            def with_controller(controller: Any = controller, trainer: Any = controlled,
                                loops: int = loops) -> None:  # fmt: skip
                target = int(trainer.global_step) + loops * steps
                controller.train(target, checkpoint_at_completion=False)

            times = _timing.interleaved(
                {
                    "hand-written numpy": _timing.repeated(hand_written, loops),
                    "looproto train()": _timing.repeated(
                        lambda trainer=trainer: trainer.train(steps), loops
                    ),
                    "looproto Controller": with_controller,
                },
                rounds=rounds,
                steps_per_call=loops * steps,
            )
            controller.close()
            rows += _timing.summarize(workload.title, times, baseline="hand-written numpy")
    print(f"NumPy {np.__version__}, {steps} steps per call\n")
    print(_timing.markdown(rows, "hand-written numpy"))
    if args.json:
        _timing.dump(args.json, {"machine": _timing.machine(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
