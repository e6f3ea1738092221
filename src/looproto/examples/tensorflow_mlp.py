"""The MLP regression of `numpy_mlp`, in TensorFlow: every inner loop is one `tf.function` call.

Run it::

    python -m looproto.examples.tensorflow_mlp --model-dir runs/tensorflow_mlp --steps 2000

The model holds `tf.Variable`s inside `looproto.Module`s (no Keras); gradients come
from `tf.GradientTape`, and SGD with momentum keeps its velocities in `tf.Variable`s
too. The data is a shuffled, repeated `tf.data` pipeline; the TensorFlow backend runs
`steps_per_loop` steps inside one `tf.function` whose body is a `tf.while_loop` that
pulls each batch in the graph (Orbit's inner loop). Evaluation runs compiled too,
accumulating its sums in `tf.Variable`s.

Checkpoints hold the variables by path (`model/layers/0/w`, `velocity/0/0`, ...) and the
position of the `tf.data` iterator, shuffle buffer included, so a run resumed with a
larger `--steps` trains on the very batches an uninterrupted run would have seen. The
initial weights are those of `numpy_mlp` (same seed, same Glorot draw).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

import looproto
from looproto.backends import tensorflow as tensorflow_backend
from looproto.examples import _cli
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


# Variables updated in the step: under a multi-worker strategy every replica computes
# the same update (from all-reduced gradients), so the first replica's is kept.
_REPLICATED = tf.VariableAggregation.ONLY_FIRST_REPLICA


class Dense(looproto.Module):
    """`y = x @ w + b` with Glorot-uniform initialisation (drawn with NumPy, like `numpy_mlp`)."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, name: str | None = None):
        super().__init__(name=name)
        limit = np.sqrt(6.0 / (n_in + n_out))
        with self.name_scope:
            self.w = tf.Variable(
                rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32),
                name="w",
                aggregation=_REPLICATED,
            )
            self.b = tf.Variable(np.zeros(n_out, np.float32), name="b", aggregation=_REPLICATED)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return x @ self.w + self.b


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

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.layers[:-1]:
            x = tf.tanh(layer(x))
        return self.layers[-1](x)


class MLPTrainer(looproto.StandardTrainer):
    """SGD with momentum; reports the mean loss of each inner loop."""

    def __init__(
        self,
        model: MLP,
        dataset: Any,
        learning_rate: float = 0.05,
        momentum: float = 0.9,
        options: looproto.StandardTrainerOptions | None = None,
    ):
        super().__init__(train_dataset=dataset, options=options)
        self.model = model
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.global_step = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="global_step", aggregation=_REPLICATED
        )
        with self.name_scope:
            # `velocity/<layer>/<0: w, 1: b>`: the tree `numpy_mlp` checkpoints.
            self.velocity = [
                (
                    tf.Variable(
                        tf.zeros_like(layer.w), trainable=False, name="v_w", aggregation=_REPLICATED
                    ),
                    tf.Variable(
                        tf.zeros_like(layer.b), trainable=False, name="v_b", aggregation=_REPLICATED
                    ),
                )
                for layer in model.layers
            ]
            self.loss_sum = tf.Variable(
                0.0, trainable=False, name="loss_sum", aggregation=_REPLICATED
            )
            self.loss_count = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="loss_count", aggregation=_REPLICATED
            )

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(0.0)
        self.loss_count.assign(0)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        params = [p for layer in self.model.layers for p in (layer.w, layer.b)]
        velocities = [v for pair in self.velocity for v in pair]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((self.model(batch["x"]) - batch["y"]) ** 2)
        grads = tape.gradient(loss, params)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Each replica has its slice of the global batch: the mean of their gradients
            # (and losses) is the global batch's, and every replica applies the same update.
            grads = replica.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
            loss = replica.all_reduce(tf.distribute.ReduceOp.MEAN, loss)
        for param, grad, velocity in zip(params, grads, velocities):
            velocity.assign(self.momentum * velocity - self.learning_rate * grad)
            param.assign_add(velocity)
        self.loss_sum.assign_add(loss)
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Mapping[str, Any]:
        count = tf.maximum(tf.cast(self.loss_count, tf.float32), 1.0)
        return {"loss": self.loss_sum / count}


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared and mean absolute error over the evaluation data, summed on device."""

    def __init__(self, model: MLP, dataset: Any):
        super().__init__(
            eval_dataset=dataset,
            options=looproto.StandardEvaluatorOptions(use_compiled_loop=True),
        )
        self.model = model
        with self.name_scope:
            # Summed over the replicas, each of which evaluates its slice of every batch.
            total = tf.VariableAggregation.SUM
            self.squared = tf.Variable(0.0, trainable=False, name="squared", aggregation=total)
            self.absolute = tf.Variable(0.0, trainable=False, name="absolute", aggregation=total)
            self.count = tf.Variable(0.0, trainable=False, name="count", aggregation=total)

    def eval_begin(self) -> None:
        for total in (self.squared, self.absolute, self.count):
            total.assign(0.0)

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        error = self.model(batch["x"]) - batch["y"]
        self.squared.assign_add(tf.reduce_sum(error**2))
        self.absolute.assign_add(tf.reduce_sum(tf.abs(error)))
        self.count.assign_add(tf.cast(tf.size(error), tf.float32))

    def eval_end(self, *args: Any) -> Mapping[str, Any]:
        count = max(float(self.count.numpy()), 1.0)
        return {
            "eval_loss": float(self.squared.numpy()) / count,
            "metrics": {"mae": float(self.absolute.numpy()) / count},
        }


def make_trainer(
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    backend_options: Mapping[str, Any] | None = None,
) -> MLPTrainer:
    """The trainer (model, optimizer state and shuffled `tf.data` pipeline) for `seed`."""
    train = make_data(4096, seed=seed)
    # A shuffle's order depends on TensorFlow's global seed as well as its own; setting it
    # makes the order `seed`'s alone, whatever ran earlier in this process (a Keras
    # `set_random_seed` call, say), so every worker and every rerun sees the same batches.
    tf.random.set_seed(seed)
    dataset = (
        tf.data.Dataset.from_tensor_slices(train)
        .shuffle(1024, seed=seed)
        .batch(batch_size, drop_remainder=True)
        .repeat()
    )
    # Under MultiWorkerMirroredStrategy (`looproto train --num-processes N`), each worker
    # takes its slice of every global batch; with one process this is the dataset itself.
    dataset = tensorflow_backend.distribute_dataset(dataset)
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    options = looproto.StandardTrainerOptions(backend_options=dict(backend_options or {}))
    return MLPTrainer(model, dataset, learning_rate, momentum, options=options)


def make_evaluator(trainer: MLPTrainer, seed: int = 0) -> MLPEvaluator:
    """An evaluator of `trainer`'s model on held-out data."""
    test = make_data(1024, seed=seed + 1)
    dataset = tensorflow_backend.distribute_dataset(
        tf.data.Dataset.from_tensor_slices(test).batch(256)
    )
    return MLPEvaluator(trainer.model, dataset)


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
    return _cli.run("tensorflow_mlp", __doc__.splitlines()[0], make_controller, argv)


if __name__ == "__main__":
    raise SystemExit(main())
