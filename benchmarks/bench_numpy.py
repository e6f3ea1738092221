"""NumPy backend: looproto (Controller + StandardTrainer) vs a hand-written NumPy loop.

Workload A: MLP 32->64->64->1, MSE, batch 64, SGD. Both sides run the very same
step function on the same data; looproto adds the outer loop (Controller, actions,
summaries every loop) and the StandardTrainer hooks.

    python benchmarks/bench_numpy.py [--smoke] [--json PATH]
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
from benchmarks import _timing


def make_params(sizes: list[int], seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in itertools.pairwise(sizes):
        params.append(rng.normal(scale=1 / np.sqrt(n_in), size=(n_in, n_out)).astype(np.float32))
        params.append(np.zeros(n_out, np.float32))
    return params


def sgd_step(params: list[np.ndarray[Any, Any]], x: Any, y: Any, lr: float = 0.01) -> float:
    """One SGD step of an MLP with ReLU and MSE, in place; returns the loss."""
    acts = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    diff = h - y
    loss = float(np.mean(diff**2))
    delta = 2 * diff / diff.size
    for i in reversed(range(n_layers)):
        gw, gb = acts[i].T @ delta, delta.sum(0)
        if i:
            delta = (delta @ params[2 * i].T) * (acts[i] > 0)
        params[2 * i] -= lr * gw
        params[2 * i + 1] -= lr * gb
    return loss


class Trainer(looproto.StandardTrainer):
    def __init__(self, batches: list[Any], sizes: list[int]) -> None:
        super().__init__(train_dataset=_Cycle(batches))
        self.global_step = looproto.create_global_step()
        self.params = [looproto.Variable(p) for p in make_params(sizes)]
        self.loss = looproto.Variable(np.float32(0), trainable=False)

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        # Update the arrays in place, exactly as the hand-written loop does.
        values = [p.value for p in self.params]
        self.loss.assign(sgd_step(values, x, y))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss.numpy()}


class _Cycle:
    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        import itertools

        return itertools.cycle(self.batches)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = [32, 64, 64, 1]
    steps, rounds = (5, 2) if args.smoke else (100, 30)
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(64, 1)).astype(np.float32))
        for _ in range(16)
    ]

    hand_params = make_params(sizes)
    hand_iter = iter(_Cycle(batches))

    def hand_written() -> None:
        for _ in range(steps):
            x, y = next(hand_iter)
            sgd_step(hand_params, x, y)

    trainer = Trainer(batches, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        controller = looproto.Controller(
            trainer=trainer,
            global_step=trainer.global_step,
            steps_per_loop=steps,
            summary_dir=os.path.join(tmp, "summaries"),
        )
        controller.train(steps)  # warm-up: imports tensorboardX, opens the event file

        def with_looproto() -> None:
            controller.train(int(trainer.global_step) + steps, checkpoint_at_completion=False)

        times = _timing.interleaved(
            {"hand-written numpy": hand_written, "looproto numpy": with_looproto},
            rounds=rounds,
            steps_per_call=steps,
        )
        controller.close()
    rows = _timing.summarize("A 32-64-64-1", times, baseline="hand-written numpy")
    print(_timing.markdown(rows, "hand-written numpy"))
    if args.json:
        _timing.dump(args.json, {"machine": _timing.machine(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
