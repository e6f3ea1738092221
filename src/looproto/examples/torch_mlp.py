"""An MLP regression trained with the PyTorch backend: `torch.compile`d steps, Adam.

Run it::

    python -m looproto.examples.torch_mlp --model-dir runs/torch_mlp --steps 2000

It trains the regression MLP of `looproto.examples.numpy_mlp` (same data, same
shape: `n_in -> 32 -> 32 -> 1`, tanh) written as a `torch.nn.Module`, with
`torch.optim.Adam`, evaluates on held-out data, writes TensorBoard summaries
under `<model-dir>/summaries/{train,eval}` and orbax checkpoints under
`<model-dir>/checkpoints`. Run it again with a larger `--steps` and it resumes
from the last checkpoint: weights, Adam's moments and step counts, the global
step and the data position. `--eager` runs without `torch.compile`;
`--compiler aot_eager` compiles faster than inductor (for a quick try).

The step keeps everything on the device: the loss is accumulated into
`looproto.Variable`s, which the torch backend holds as tensors while a loop runs
and reads back once at its end; the evaluator reduces on the device and reads
its totals back in one transfer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import looproto
from looproto.backends import torch as torch_backend
from looproto.data import ArrayDataset
from looproto.examples.numpy_mlp import make_data

__all__ = ["MLP", "MLPEvaluator", "MLPTrainer", "make_controller", "main"]


class MLP(torch.nn.Module):
    """`n_in -> hidden -> hidden -> 1` with tanh activations."""

    def __init__(self, n_in: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class MLPTrainer(looproto.StandardTrainer):
    """Adam on the MLP; reports the mean loss of each inner loop."""

    def __init__(
        self,
        model: MLP,
        dataset: ArrayDataset,
        learning_rate: float = 3e-3,
        options: looproto.StandardTrainerOptions | None = None,
    ) -> None:
        super().__init__(train_dataset=dataset, options=options)
        self.model = model
        # Named parameters: optimizer state is checkpointed under the parameters' names.
        self.optimizer = torch.optim.Adam(model.named_parameters(), lr=learning_rate)
        self.global_step = looproto.create_global_step()
        with self.name_scope:
            self.loss_sum = looproto.Variable(np.float32(0), trainable=False, name="loss_sum")
            self.loss_count = looproto.Variable(np.int64(0), trainable=False, name="loss_count")

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0)

    def train_step(self, iterator: Any) -> Mapping[str, torch.Tensor]:
        batch = next(iterator)
        loss = torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        loss.backward()  # type: ignore[no-untyped-call]  # (untyped in torch's stubs)
        self.optimizer.step()
        self.optimizer.zero_grad()
        # Tensors while the loop runs (no host sync per step); NumPy again afterwards.
        self.loss_sum.assign_add(loss.detach())
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)
        return {"loss": loss}

    def train_loop_end(self) -> Mapping[str, Any]:
        return {"loss": self.loss_sum.numpy() / max(int(self.loss_count), 1)}


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared error and mean absolute error over the evaluation data."""

    def __init__(
        self,
        model: MLP,
        dataset: ArrayDataset,
        options: looproto.StandardEvaluatorOptions | None = None,
    ) -> None:
        super().__init__(eval_dataset=dataset, options=options)
        self.model = model

    def eval_begin(self) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        return {
            "squared": torch.zeros((), device=device),
            "absolute": torch.zeros((), device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def eval_step(self, iterator: Any) -> dict[str, torch.Tensor]:
        batch = next(iterator)
        with torch.no_grad():
            err = self.model(batch["x"]) - batch["y"]
        return {
            "squared": (err**2).sum(),
            "absolute": err.abs().sum(),
            "count": torch.tensor(err.numel(), device=err.device),
        }

    def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
        # Device tensors in, device tensors out: no host sync per step.
        return {key: state[key] + step_outputs[key] for key in state}

    def eval_end(self, *args: Any) -> Mapping[str, Any]:
        (state,) = args
        host = torch_backend.BACKEND.to_host(state)  # One transfer for all three.
        count = max(int(host["count"]), 1)
        return {
            "eval_loss": float(host["squared"]) / count,
            "metrics": {"mae": float(host["absolute"]) / count},
        }


def make_controller(
    model_dir: str,
    *,
    steps_per_loop: int = 100,
    checkpoint_interval: int = 500,
    batch_size: int = 64,
    seed: int = 0,
    compile_step: bool = True,
    backend_options: Mapping[str, Any] | None = None,
) -> tuple[looproto.Controller, MLPTrainer]:
    """Builds data, model, trainer, evaluator, checkpoint manager and controller.

    Args:
        model_dir: Where summaries and checkpoints go.
        steps_per_loop: Steps per inner loop (one host sync each).
        checkpoint_interval: Least steps between two checkpoints.
        batch_size: Training batch size.
        seed: Seeds the data, its shuffling and the model's initialisation.
        compile_step: `torch.compile` the steps (False: eager).
        backend_options: The torch backend's options (`backend`, `mode`, `device`, ...).
    """
    train = make_data(4096, seed=seed)
    test = make_data(1024, seed=seed + 1)
    backend_options = dict(backend_options or {})
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    if "device" in backend_options:
        model.to(backend_options["device"])
    trainer = MLPTrainer(
        model,
        ArrayDataset(train, batch_size, shuffle=True, seed=seed, epochs=None),
        options=looproto.StandardTrainerOptions(
            use_compiled_step=compile_step,
            use_compiled_loop=compile_step,
            backend="torch",
            backend_options=backend_options,
        ),
    )
    evaluator = MLPEvaluator(
        model,
        ArrayDataset(test, 256, drop_remainder=False),
        options=looproto.StandardEvaluatorOptions(
            use_compiled_step=compile_step, backend="torch", backend_options=backend_options
        ),
    )
    checkpoints = looproto.CheckpointManager(
        os.path.join(model_dir, "checkpoints"),
        trainer,
        max_to_keep=3,
        checkpoint_interval=checkpoint_interval,
        step_counter=trainer.global_step,
    )
    controller = looproto.Controller(
        trainer=trainer,
        evaluator=evaluator,
        global_step=trainer.global_step,
        steps_per_loop=steps_per_loop,
        checkpoint_manager=checkpoints,
        summary_dir=os.path.join(model_dir, "summaries", "train"),
        eval_summary_dir=os.path.join(model_dir, "summaries", "eval"),
    )
    return controller, trainer


def main(argv: list[str] | None = None) -> int:
    """Trains and evaluates; prints where the run got to."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join("runs", "torch_mlp"))
    parser.add_argument("--steps", type=int, default=2000, help="global step to train to")
    parser.add_argument("--steps-per-loop", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=500)
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the steps")
    parser.add_argument("--compiler", default=None, help='torch.compile backend ("inductor")')
    parser.add_argument("--mode", default=None, help='torch.compile mode ("reduce-overhead")')
    parser.add_argument("--device", default=None, help='e.g. "cuda"; default: CPU')
    parser.add_argument("--nan-check", action="store_true", help="stop on a non-finite loss")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("looproto").setLevel(logging.WARNING if args.quiet else logging.INFO)
    backend_options: dict[str, Any] = {"nan_check": args.nan_check}
    for key, value in (("backend", args.compiler), ("mode", args.mode), ("device", args.device)):
        if value is not None:
            backend_options[key] = value
    controller, trainer = make_controller(
        args.model_dir,
        steps_per_loop=args.steps_per_loop,
        compile_step=not args.eager,
        backend_options=backend_options,
    )
    start = int(trainer.global_step)
    with controller:
        output = controller.train_and_evaluate(
            train_steps=args.steps, eval_steps=-1, eval_interval=args.eval_interval
        )
    if output is None:
        print(f"Already trained to step {start}; pass a larger --steps to continue.")
    else:
        print(
            f"Trained steps {start} -> {int(trainer.global_step)}; "
            f"eval_loss {float(np.asarray(output['eval_loss'])):.4f}. "
            f"TensorBoard: tensorboard --logdir {os.path.join(args.model_dir, 'summaries')}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
