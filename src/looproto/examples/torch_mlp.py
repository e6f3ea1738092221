"""The MLP regression of `numpy_mlp`, in PyTorch: a `torch.nn.Module`, `torch.compile`d steps.

Run it::

    python -m looproto.examples.torch_mlp --model-dir runs/torch_mlp --steps 2000

The model is a plain `torch.nn.Module` (`n_in -> 32 -> 32 -> 1`, tanh) starting from
the very weights `numpy_mlp` draws; it trains with `torch.optim.SGD` with momentum (the
other examples' optimizer and settings), evaluates on held-out data, writes TensorBoard
summaries under `<model-dir>/summaries/{train,eval}` and orbax checkpoints under
`<model-dir>/checkpoints`. Run it again with a larger `--steps` and it resumes from the
last checkpoint: weights, the optimizer's momentum buffers, the global step and the
data position. `--eager` runs without `torch.compile`; `--compiler aot_eager` compiles
faster than inductor (for a quick try).

The step keeps everything on the device: the loss is accumulated into
`looproto.Variable`s, which the torch backend holds as tensors while a loop runs and
reads back once at its end; the evaluator reduces on the device and reads its totals
back in one transfer.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import looproto
from looproto import distributed
from looproto.backends import torch as torch_backend
from looproto.data import ArrayDataset
from looproto.examples import _cli, numpy_mlp
from looproto.examples.numpy_mlp import make_data

__all__ = [
    "MLP",
    "MLPEvaluator",
    "MLPTrainer",
    "main",
    "make_controller",
    "make_evaluator",
    "make_trainer",
]


class MLP(torch.nn.Module):
    """`n_in -> hidden -> hidden -> 1` with tanh, initialised like `numpy_mlp.MLP(seed)`."""

    def __init__(self, n_in: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )
        # The same Glorot-uniform draw as the NumPy example (`Linear` stores w transposed).
        reference = numpy_mlp.MLP(n_in, hidden, seed=seed)
        linears = [m for m in self.layers if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for linear, dense in zip(linears, reference.layers):
                linear.weight.copy_(torch.from_numpy(dense.w.numpy().T))
                linear.bias.copy_(torch.from_numpy(dense.b.numpy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class MLPTrainer(looproto.StandardTrainer):
    """SGD with momentum on the MLP; reports the mean loss of each inner loop."""

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: ArrayDataset,
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        options: looproto.StandardTrainerOptions | None = None,
    ) -> None:
        super().__init__(train_dataset=dataset, options=options)
        self.model = model  # The MLP, or the MLP in `DistributedDataParallel`.
        # Named parameters: optimizer state is checkpointed under the parameters' names
        # (those of the MLP itself, so a DDP run's checkpoint keeps a one-process run's paths).
        inner: torch.nn.Module = getattr(model, "module", model)
        self.optimizer = torch.optim.SGD(
            inner.named_parameters(), lr=learning_rate, momentum=momentum
        )
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
        if torch_backend.process_group_size() > 1:
            # Each process summed the loss of its slice of the batches: the mean over the
            # processes is the global batches' loss (equal slices), as one process has it.
            total = torch.tensor(float(self.loss_sum.numpy()), dtype=torch.float64)
            torch.distributed.all_reduce(total)
            self.loss_sum.assign(np.float32(total.item() / torch.distributed.get_world_size()))
        return {"loss": self.loss_sum.numpy() / max(int(self.loss_count), 1)}


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared error and mean absolute error over the evaluation data."""

    def __init__(
        self,
        model: torch.nn.Module,
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


def _options(
    cls: type[Any], compile_step: bool, backend_options: Mapping[str, Any] | None, **extra: Any
) -> Any:
    return cls(
        use_compiled_step=compile_step,
        backend="torch",
        backend_options=dict(backend_options or {}),
        **extra,
    )


def make_trainer(
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    backend_options: Mapping[str, Any] | None = None,
    compile_step: bool = True,
) -> MLPTrainer:
    """The trainer (model, optimizer and shuffled training data) for `seed`.

    Args:
        seed: Seeds the data, its shuffling and the model's initialisation.
        batch_size: Training batch size.
        learning_rate: SGD step size.
        momentum: SGD momentum.
        backend_options: The torch backend's options (`backend`, `mode`, `device`, ...);
            the model is moved to `device` if one is given.
        compile_step: `torch.compile` the step (False: eager).
    """
    train = make_data(4096, seed=seed)
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    if backend_options and "device" in backend_options:
        model.to(backend_options["device"])
    options = _options(
        looproto.StandardTrainerOptions, compile_step, backend_options,
        use_compiled_loop=compile_step,
    )  # fmt: skip
    # Over several processes: DDP averages the gradients, and each process takes its
    # slice of every global batch of `batch_size` (one process: both are no-ops).
    dataset = ArrayDataset(
        train, batch_size, shuffle=True, seed=seed, epochs=None, shard=distributed.shard()
    )
    return MLPTrainer(
        torch_backend.data_parallel(model), dataset, learning_rate, momentum, options=options
    )


def make_evaluator(
    trainer: MLPTrainer,
    seed: int = 0,
    backend_options: Mapping[str, Any] | None = None,
    compile_step: bool = True,
) -> MLPEvaluator:
    """An evaluator of `trainer`'s model on held-out data."""
    test = make_data(1024, seed=seed + 1)
    options = _options(looproto.StandardEvaluatorOptions, compile_step, backend_options)
    return MLPEvaluator(trainer.model, ArrayDataset(test, 256, drop_remainder=False), options)


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
    """Builds trainer, evaluator, checkpoint manager and controller under `model_dir`."""
    trainer = make_trainer(
        seed, batch_size, backend_options=backend_options, compile_step=compile_step
    )
    evaluator = make_evaluator(
        trainer, seed, backend_options=backend_options, compile_step=compile_step
    )
    controller = _cli.controller(
        model_dir,
        trainer,
        evaluator,
        steps_per_loop=steps_per_loop,
        checkpoint_interval=checkpoint_interval,
    )
    return controller, trainer


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eager", action="store_true", help="do not torch.compile the steps")
    parser.add_argument("--compiler", default=None, help='torch.compile backend ("inductor")')
    parser.add_argument("--mode", default=None, help='torch.compile mode ("reduce-overhead")')
    parser.add_argument("--device", default=None, help='e.g. "cuda"; default: CPU')
    parser.add_argument("--nan-check", action="store_true", help="stop on a non-finite loss")


def _controller_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    backend_options: dict[str, Any] = {"nan_check": args.nan_check}
    for key, value in (("backend", args.compiler), ("mode", args.mode), ("device", args.device)):
        if value is not None:
            backend_options[key] = value
    return {"compile_step": not args.eager, "backend_options": backend_options}


def main(argv: list[str] | None = None) -> int:
    """Trains and evaluates; prints the loss curve's end points."""
    return _cli.run(
        "torch_mlp",
        __doc__.splitlines()[0],
        make_controller,
        argv,
        add_arguments=_add_arguments,
        controller_kwargs=_controller_kwargs,
    )


if __name__ == "__main__":
    raise SystemExit(main())
