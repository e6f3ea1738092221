"""An MLP regression trained with the NumPy backend: no framework needed.

Run it::

    python -m looproto.examples.numpy_mlp --model-dir runs/numpy_mlp --steps 2000

It trains a 2-layer MLP with hand-written backprop and SGD with momentum on a
synthetic regression problem, evaluates on held-out data, writes TensorBoard
summaries under `<model-dir>/summaries/{train,eval}` and orbax checkpoints under
`<model-dir>/checkpoints`. Run it again with a larger `--steps` and it resumes
from the last checkpoint, data position and all.

The model and its data are small enough that the example doubles as a test
fixture (`tests/examples/test_numpy_mlp.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

import looproto
from looproto.data import ArrayDataset
from looproto.examples import _cli

__all__ = [
    "MLP",
    "MLPEvaluator",
    "MLPTrainer",
    "main",
    "make_controller",
    "make_data",
    "make_evaluator",
    "make_trainer",
]


def make_data(
    num_examples: int, num_features: int = 8, seed: int = 0
) -> dict[str, np.ndarray[Any, Any]]:
    """A smooth nonlinear regression target with a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, num_features)).astype(np.float32)
    w = np.linspace(-1.0, 1.0, num_features, dtype=np.float32)
    y = np.sin(x @ w)[:, None] + 0.1 * np.tanh(x[:, :1] * x[:, 1:2])
    y += rng.normal(scale=0.05, size=y.shape)
    return {"x": x, "y": y.astype(np.float32)}


class Dense(looproto.Module):
    """`y = x @ w + b`, with Glorot-uniform initialisation."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, name: str | None = None):
        super().__init__(name=name)
        limit = np.sqrt(6.0 / (n_in + n_out))
        with self.name_scope:
            self.w = looproto.Variable(
                rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32), name="w"
            )
            self.b = looproto.Variable(np.zeros(n_out, np.float32), name="b")

    def __call__(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        y: np.ndarray[Any, Any] = x @ self.w.value + self.b.value
        return y


class MLP(looproto.Module):
    """`n_in -> hidden -> hidden -> 1` with tanh activations."""

    def __init__(self, n_in: int, hidden: int = 32, seed: int = 0, name: str | None = None):
        super().__init__(name=name)
        rng = np.random.default_rng(seed)
        with self.name_scope:
            self.layers = [
                Dense(n_in, hidden, rng),
                Dense(hidden, hidden, rng),
                Dense(hidden, 1, rng),
            ]

    def forward(self, x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], list[Any]]:
        """Returns the prediction and the activations backprop needs."""
        acts = [x]
        h = x
        for layer in self.layers[:-1]:
            h = np.tanh(layer(h))
            acts.append(h)
        return self.layers[-1](h), acts

    def loss_and_grads(
        self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
    ) -> tuple[np.float32, list[tuple[Any, Any]]]:
        """Mean squared error and its gradient for each `(w, b)` pair."""
        pred, acts = self.forward(x)
        diff = pred - y
        loss = np.mean(diff**2)
        delta = (2.0 / diff.size) * diff
        grads: list[tuple[Any, Any]] = []
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            grads.append((acts[i].T @ delta, delta.sum(axis=0)))
            if i:
                delta = (delta @ layer.w.value.T) * (1.0 - acts[i] ** 2)
        grads.reverse()
        return loss.astype(np.float32), grads


class MLPTrainer(looproto.StandardTrainer):
    """SGD with momentum on the MLP; reports the mean loss of each inner loop."""

    def __init__(
        self,
        model: MLP,
        dataset: ArrayDataset,
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        options: looproto.StandardTrainerOptions | None = None,
    ):
        super().__init__(train_dataset=dataset, options=options)
        self.model = model
        self.global_step = looproto.create_global_step()
        self.learning_rate = learning_rate
        self.momentum = momentum
        with self.name_scope:
            self.velocity = [
                (
                    looproto.Variable(np.zeros_like(layer.w.value), trainable=False, name="v_w"),
                    looproto.Variable(np.zeros_like(layer.b.value), trainable=False, name="v_b"),
                )
                for layer in model.layers
            ]
            self.loss_sum = looproto.Variable(np.float32(0), trainable=False, name="loss_sum")
            self.loss_count = looproto.Variable(np.int64(0), trainable=False, name="loss_count")

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        loss, grads = self.model.loss_and_grads(batch["x"], batch["y"])
        for layer, layer_grads, velocities in zip(self.model.layers, grads, self.velocity):
            for param, grad, velocity in zip((layer.w, layer.b), layer_grads, velocities):
                velocity.assign(self.momentum * velocity.value - self.learning_rate * grad)
                param.assign(param.value + velocity.value)
        self.loss_sum.assign_add(loss)
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Mapping[str, Any]:
        return {"loss": self.loss_sum.numpy() / max(int(self.loss_count), 1)}


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared error and mean absolute error over the evaluation data."""

    def __init__(self, model: MLP, dataset: ArrayDataset):
        super().__init__(eval_dataset=dataset)
        self.model = model

    def eval_begin(self) -> dict[str, float]:
        return {"squared": 0.0, "absolute": 0.0, "count": 0}

    def eval_step(self, iterator: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        batch = next(iterator)
        pred, _ = self.model.forward(batch["x"])
        return pred, batch["y"]

    def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
        pred, y = step_outputs
        state["squared"] += float(np.sum((pred - y) ** 2))
        state["absolute"] += float(np.sum(np.abs(pred - y)))
        state["count"] += int(y.size)
        return state

    def eval_end(self, *args: Any) -> Mapping[str, Any]:
        (state,) = args
        count = max(state["count"], 1)
        return {
            "eval_loss": state["squared"] / count,
            "metrics": {"mae": state["absolute"] / count},
        }


def make_trainer(
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    backend_options: Mapping[str, Any] | None = None,
) -> MLPTrainer:
    """The trainer (model, optimizer state and shuffled training data) for `seed`."""
    train = make_data(4096, seed=seed)
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    dataset = ArrayDataset(train, batch_size, shuffle=True, seed=seed, epochs=None)
    options = looproto.StandardTrainerOptions(backend_options=dict(backend_options or {}))
    return MLPTrainer(model, dataset, learning_rate, momentum, options=options)


def make_evaluator(trainer: MLPTrainer, seed: int = 0) -> MLPEvaluator:
    """An evaluator of `trainer`'s model on held-out data."""
    test = make_data(1024, seed=seed + 1)
    return MLPEvaluator(trainer.model, ArrayDataset(test, 256, drop_remainder=False))


def make_controller(
    model_dir: str,
    *,
    steps_per_loop: int = 100,
    checkpoint_interval: int = 500,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[looproto.Controller, MLPTrainer]:
    """Builds trainer, evaluator, checkpoint manager and controller under `model_dir`."""
    trainer = make_trainer(seed, batch_size)
    evaluator = make_evaluator(trainer, seed)
    controller = _cli.controller(
        model_dir,
        trainer,
        evaluator,
        steps_per_loop=steps_per_loop,
        checkpoint_interval=checkpoint_interval,
    )
    return controller, trainer


def main(argv: list[str] | None = None) -> int:
    """Trains and evaluates; prints the loss curve's end points."""
    return _cli.run("numpy_mlp", __doc__.splitlines()[0], make_controller, argv)


if __name__ == "__main__":
    raise SystemExit(main())
