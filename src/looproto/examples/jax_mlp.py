"""The MLP regression of `numpy_mlp`, in JAX: every inner loop is one `jax.jit` call.

Run it::

    python -m looproto.examples.jax_mlp --model-dir runs/jax_mlp --steps 2000

The same problem, model, data and outer loop as `looproto.examples.numpy_mlp`: a
2-hidden-layer tanh MLP on a synthetic regression target, trained with SGD with
momentum, evaluated on held-out data, with TensorBoard summaries under
`<model-dir>/summaries/{train,eval}` and orbax checkpoints under
`<model-dir>/checkpoints`. Run it again with a larger `--steps` and it resumes
from the last checkpoint, data position and all.

What changes on JAX is only the step body: the gradient comes from
`looproto.backends.jax.value_and_grad` instead of hand-written backprop. The
step is still written statefully (`param.assign(...)`); the backend lifts the
trainer's `Variable`s into one jitted `lax.scan` per `train(steps_per_loop)`
and writes them back before `train_loop_end`, summaries and checkpoints run.
The evaluator's loop is compiled too (`use_compiled_loop=True`): it accumulates
into `Variable`s instead of reducing into Python state.

The trainer checkpoints exactly `numpy_mlp`'s tree (paths, shapes and dtypes:
`model/layers/0/w`, `velocity/0/0`, the int64 `loss_count`, ...) with the same
initial weights, so a NumPy run's checkpoint resumes here and vice versa.
`make_controller(..., data="device")` keeps the training set on the device and
sends only batch indices each loop (see `docs/backends/jax.md` for the trade-off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import looproto
from looproto import distributed
from looproto.backends import jax as jax_backend
from looproto.data import ArrayDataset
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


class Dense(looproto.Module):
    """`y = x @ w + b`, with Glorot-uniform initialisation (as in the NumPy example)."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, name: str | None = None):
        super().__init__(name=name)
        limit = np.sqrt(6.0 / (n_in + n_out))
        with self.name_scope:
            self.w = looproto.Variable(
                jnp.asarray(rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32)), name="w"
            )
            self.b = looproto.Variable(jnp.zeros(n_out, jnp.float32), name="b")

    def __call__(self, x: jax.Array) -> jax.Array:
        y: jax.Array = x @ self.w.value + self.b.value
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

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.layers[:-1]:
            h = jnp.tanh(layer(h))
        return self.layers[-1](h)


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
            # `velocity/<layer>/<0: w, 1: b>`: the tree `numpy_mlp` checkpoints.
            self.velocity = [
                (
                    looproto.Variable(jnp.zeros_like(layer.w.value), trainable=False, name="v_w"),
                    looproto.Variable(jnp.zeros_like(layer.b.value), trainable=False, name="v_b"),
                )
                for layer in model.layers
            ]
            self.loss_sum = looproto.Variable(jnp.float32(0), trainable=False, name="loss_sum")
            # int64 as in `numpy_mlp`; JAX runs it in int32 and the backend writes it
            # back as NumPy int64 after each loop, like the global step.
            self.loss_count = looproto.Variable(np.int64(0), trainable=False, name="loss_count")

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(jnp.zeros_like(self.loss_sum.value))
        self.loss_count.assign(0)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)

        def loss_fn() -> jax.Array:
            return jnp.mean((self.model(batch["x"]) - batch["y"]) ** 2)

        loss, grads = jax_backend.value_and_grad(loss_fn, self.model)
        for i, (layer, velocities) in enumerate(zip(self.model.layers, self.velocity)):
            for param, name, velocity in zip((layer.w, layer.b), "wb", velocities):
                grad = grads[f"layers/{i}/{name}"]
                velocity.assign(self.momentum * velocity.value - self.learning_rate * grad)
                param.assign(param.value + velocity.value)
        self.loss_sum.assign_add(loss)
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Mapping[str, Any]:
        # The Variables hold this loop's final values here; one transfer to the host.
        loss = self.loss_sum.value / max(int(self.loss_count), 1)
        out: Mapping[str, Any] = jax_backend.BACKEND.to_host({"loss": loss})
        return out


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared and mean absolute error, accumulated on device in one compiled loop."""

    def __init__(self, model: MLP, dataset: ArrayDataset):
        super().__init__(
            eval_dataset=dataset,
            options=looproto.StandardEvaluatorOptions(use_compiled_loop=True),
        )
        self.model = model
        self.squared = looproto.Variable(jnp.float32(0), trainable=False, name="squared")
        self.absolute = looproto.Variable(jnp.float32(0), trainable=False, name="absolute")
        self.count = looproto.Variable(jnp.int32(0), trainable=False, name="count")

    def eval_begin(self) -> None:
        for total in (self.squared, self.absolute, self.count):
            total.assign(jnp.zeros_like(total.value))

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        diff = self.model(batch["x"]) - batch["y"]
        self.squared.assign_add(jnp.sum(diff**2))
        self.absolute.assign_add(jnp.sum(jnp.abs(diff)))
        self.count.assign_add(diff.size)

    def eval_end(self, *args: Any) -> Mapping[str, Any]:
        count = jnp.maximum(self.count.value, 1)
        out: Mapping[str, Any] = jax_backend.BACKEND.to_host(
            {
                "eval_loss": self.squared.value / count,
                "metrics": {"mae": self.absolute.value / count},
            }
        )
        return out


def make_trainer(
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    data: str = "stack",
    backend_options: Mapping[str, Any] | None = None,
) -> MLPTrainer:
    """The trainer (model, optimizer state and shuffled training data) for `seed`.

    Args:
        seed: Seeds the data, the initialisation and the shuffling.
        batch_size: Training batch size.
        learning_rate: SGD step size.
        momentum: SGD momentum.
        data: The JAX backend's `data` option: `"stack"` or `"device"`.
        backend_options: More JAX backend options (`mesh`, `donate`, ...; a `data`
            entry here wins over `data`).
    """
    train = make_data(4096, seed=seed)
    model = MLP(n_in=train["x"].shape[1], seed=seed)
    # Over several processes each takes its slice of every global batch of `batch_size`.
    dataset = ArrayDataset(
        train, batch_size, shuffle=True, seed=seed, epochs=None, shard=distributed.shard()
    )
    options = looproto.StandardTrainerOptions(
        backend="jax", backend_options={"data": data, **(backend_options or {})}
    )
    return MLPTrainer(model, dataset, learning_rate, momentum, options=options)


def make_evaluator(trainer: MLPTrainer, seed: int = 0) -> MLPEvaluator:
    """An evaluator of `trainer`'s model on held-out data."""
    test = make_data(1024, seed=seed + 1)
    dataset = ArrayDataset(test, 256, drop_remainder=False, shard=distributed.shard())
    return MLPEvaluator(trainer.model, dataset)


def make_controller(
    model_dir: str,
    *,
    steps_per_loop: int = 100,
    checkpoint_interval: int = 500,
    batch_size: int = 64,
    seed: int = 0,
    data: str = "stack",
) -> tuple[looproto.Controller, MLPTrainer]:
    """Builds trainer, evaluator, checkpoint manager and controller under `model_dir`."""
    trainer = make_trainer(seed, batch_size, data=data)
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
    return _cli.run("jax_mlp", __doc__.splitlines()[0], make_controller, argv)


if __name__ == "__main__":
    raise SystemExit(main())
