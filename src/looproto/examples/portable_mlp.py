"""The MLP regression of `numpy_mlp`, written once: the same code runs on JAX, PyTorch, TensorFlow.

Run it (or `looproto train src/looproto/examples/configs/portable_<backend>.toml`)::

    python -m looproto.examples.portable_mlp --backend jax --model-dir runs/portable_mlp

The model is `numpy_mlp`'s (`n_in -> 32 -> 32 -> 1`, tanh, the same Glorot draw), its
state in `looproto.Variable`s holding NumPy arrays and its math against the Python
array API (`looproto.portable.array_namespace`). The gradient comes from the backend
(`looproto.portable.value_and_grad`), the update from `looproto.portable.SGD` (or
`Adam`), written against the array API too. Each backend runs it in its compiled inner
loop: one `jax.jit(lax.scan)` call, `torch.compile`d steps, or one `tf.function` whose
`tf.while_loop` runs all steps; the Variables are lifted into the framework while a loop
runs and are NumPy arrays again after it. The data is an `ArrayDataset` on every backend,
so the batches, the iterator's checkpointed position and the whole checkpoint tree are
the same whatever backend runs: a run started on JAX resumes on PyTorch or TensorFlow,
and the NumPy backend evaluates any of their checkpoints (it cannot train: it has no
gradients).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

import looproto
from looproto import backends, portable
from looproto.data import ArrayDataset
from looproto.errors import ConfigError, value_repr
from looproto.examples import _cli
from looproto.examples.numpy_mlp import make_data

__all__ = [
    "MLP",
    "MLPEvaluator",
    "MLPTrainer",
    "evaluator",
    "main",
    "make_controller",
    "make_evaluator",
    "make_trainer",
    "trainer",
]

OPTIMIZERS = ("sgd", "adam")


class Dense(looproto.Module):
    """`y = x @ w + b`, with `numpy_mlp`'s Glorot-uniform initialisation."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, name: str | None = None):
        super().__init__(name=name)
        limit = np.sqrt(6.0 / (n_in + n_out))
        with self.name_scope:
            self.w = looproto.Variable(
                rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32), name="w"
            )
            self.b = looproto.Variable(np.zeros(n_out, np.float32), name="b")

    def __call__(self, x: Any) -> Any:
        return x @ self.w.value + self.b.value


class MLP(looproto.Module):
    """`n_in -> hidden -> hidden -> 1` with tanh activations, in any framework's arrays."""

    def __init__(self, n_in: int, hidden: int = 32, seed: int = 0, name: str | None = None):
        super().__init__(name=name)
        rng = np.random.default_rng(seed)
        with self.name_scope:
            self.layers = [
                Dense(n_in, hidden, rng),
                Dense(hidden, hidden, rng),
                Dense(hidden, 1, rng),
            ]

    def __call__(self, x: Any) -> Any:
        xp = portable.array_namespace(x)
        for layer in self.layers[:-1]:
            x = xp.tanh(layer(x))
        return self.layers[-1](x)


class MLPTrainer(looproto.StandardTrainer):
    """Mean squared error, the backend's gradient, a portable optimizer; reports the mean loss.

    Args:
        model: The model.
        dataset: The training data (an `ArrayDataset` of `{"x", "y"}` batches).
        optimizer: A `looproto.portable.Optimizer` of `model`.
        options: Must name the backend (`backend=`): the step asks it for gradients.
    """

    def __init__(
        self,
        model: MLP,
        dataset: ArrayDataset,
        optimizer: portable.Optimizer,
        options: looproto.StandardTrainerOptions,
    ) -> None:
        super().__init__(train_dataset=dataset, options=options)
        self.model = model
        self.optimizer = optimizer
        self.global_step = looproto.create_global_step()
        with self.name_scope:
            self.loss_sum = looproto.Variable(np.float32(0), trainable=False, name="loss_sum")
            self.loss_count = looproto.Variable(np.int64(0), trainable=False, name="loss_count")
        self._backend_name = backends.get(options.backend).name

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)

        def loss_fn() -> Any:
            xp = portable.array_namespace(batch["x"])
            return xp.mean((self.model(batch["x"]) - batch["y"]) ** 2)

        loss, grads = portable.value_and_grad(loss_fn, self.model, backend=self._backend_name)
        self.optimizer.apply(grads)
        self.loss_sum.assign_add(loss)
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Mapping[str, Any]:
        return {"loss": self.loss_sum.numpy() / max(int(self.loss_count), 1)}


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared and mean absolute error, summed in Variables inside the compiled loop."""

    def __init__(
        self, model: MLP, dataset: ArrayDataset, options: looproto.StandardEvaluatorOptions
    ) -> None:
        super().__init__(eval_dataset=dataset, options=options)
        self.model = model
        with self.name_scope:
            self.squared = looproto.Variable(np.float32(0), trainable=False, name="squared")
            self.absolute = looproto.Variable(np.float32(0), trainable=False, name="absolute")
            self.count = looproto.Variable(np.int64(0), trainable=False, name="count")

    def eval_begin(self) -> None:
        for total in (self.squared, self.absolute, self.count):
            total.assign(0)

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        xp = portable.array_namespace(batch["x"])
        error = self.model(batch["x"]) - batch["y"]
        self.squared.assign_add(xp.sum(error**2))
        self.absolute.assign_add(xp.sum(xp.abs(error)))
        self.count.assign_add(int(error.shape[0]))

    def eval_end(self, *args: Any) -> Mapping[str, Any]:
        count = max(int(self.count), 1)
        return {
            "eval_loss": float(self.squared.numpy()) / count,
            "metrics": {"mae": float(self.absolute.numpy()) / count},
        }


def _backend(backend: str | None) -> str:
    return backends.get(backend).name  # Validates the name; None: LOOPROTO_BACKEND or numpy.


def make_optimizer(
    name: str, model: MLP, learning_rate: float = 0.05, momentum: float = 0.9
) -> portable.Optimizer:
    """`"sgd"` (with `momentum`) or `"adam"` for `model`."""
    if name == "sgd":
        return portable.SGD(model, learning_rate=learning_rate, momentum=momentum)
    if name == "adam":
        return portable.Adam(model, learning_rate=learning_rate)
    raise ConfigError(
        f"`optimizer` must be one of {list(OPTIMIZERS)}; received {value_repr(name)}."
    )


def make_trainer(
    backend: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    backend_options: Mapping[str, Any] | None = None,
) -> MLPTrainer:
    """The trainer (model, optimizer and shuffled training data) for `seed`, on `backend`.

    Args:
        backend: `"jax"`, `"torch"` or `"tensorflow"` to train (`"numpy"` builds a
            trainer whose checkpoints can be restored and evaluated, but `train` raises
            `ConfigError`); None: `LOOPROTO_BACKEND`, else NumPy.
        seed: Seeds the data, the initialisation and the shuffling.
        batch_size: Training batch size.
        learning_rate: The optimizer's step size.
        momentum: SGD's momentum (unused by Adam).
        optimizer: `"sgd"` or `"adam"`.
        backend_options: That backend's options (`StandardTrainerOptions.backend_options`).
    """
    name = _backend(backend)
    train = make_data(4096, seed=seed)
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    dataset = ArrayDataset(train, batch_size, shuffle=True, seed=seed, epochs=None)
    options = looproto.StandardTrainerOptions(
        backend=name, backend_options=dict(backend_options or {})
    )
    opt = make_optimizer(optimizer, model, learning_rate, momentum)
    return MLPTrainer(model, dataset, opt, options)


def make_evaluator(
    trainer: MLPTrainer,
    backend: str | None = None,
    seed: int = 0,
    backend_options: Mapping[str, Any] | None = None,
) -> MLPEvaluator:
    """An evaluator of `trainer`'s model on held-out data, on `backend` (default: the trainer's)."""
    name = _backend(backend or trainer._backend_name)
    test = make_data(1024, seed=seed + 1)
    options = looproto.StandardEvaluatorOptions(
        use_compiled_loop=True, backend=name, backend_options=dict(backend_options or {})
    )
    return MLPEvaluator(trainer.model, ArrayDataset(test, 256, drop_remainder=False), options)


def trainer(
    backend: str,
    backend_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    optimizer: str = "sgd",
) -> MLPTrainer:
    """The config factory (`factory = "looproto.examples.portable_mlp:trainer"`)."""
    return make_trainer(
        backend, seed, batch_size, learning_rate, momentum, optimizer, backend_options
    )


def evaluator(
    backend: str,
    trainer: MLPTrainer,
    seed: int = 0,
    backend_options: Mapping[str, Any] | None = None,
) -> MLPEvaluator:
    """The config factory (`factory = "looproto.examples.portable_mlp:evaluator"`)."""
    return make_evaluator(trainer, backend, seed, backend_options)


def make_controller(
    model_dir: str,
    *,
    backend: str | None = None,
    steps_per_loop: int = 100,
    checkpoint_interval: int = 500,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str = "sgd",
    backend_options: Mapping[str, Any] | None = None,
) -> tuple[looproto.Controller, MLPTrainer]:
    """Builds trainer, evaluator, checkpoint manager and controller under `model_dir`.

    The controller restores the newest checkpoint in `<model_dir>/checkpoints`,
    whichever backend wrote it.
    """
    trainer = make_trainer(
        backend, seed, batch_size, optimizer=optimizer, backend_options=backend_options
    )
    evaluator = make_evaluator(trainer, seed=seed, backend_options=backend_options)
    controller = _cli.controller(
        model_dir,
        trainer,
        evaluator,
        steps_per_loop=steps_per_loop,
        checkpoint_interval=checkpoint_interval,
    )
    return controller, trainer


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", default=None, help="jax, torch or tensorflow (default: $LOOPROTO_BACKEND)"
    )
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)


def _controller_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"backend": args.backend, "optimizer": args.optimizer}


def main(argv: list[str] | None = None) -> int:
    """Trains and evaluates; prints the loss curve's end points."""
    return _cli.run(
        "portable_mlp",
        __doc__.splitlines()[0],
        make_controller,
        argv,
        add_arguments=_add_arguments,
        controller_kwargs=_controller_kwargs,
    )


if __name__ == "__main__":
    raise SystemExit(main())
