"""The MLP regression of `numpy_mlp` as a Flax NNX model with optax, in one jit per loop.

Run it::

    python -m looproto.examples.flax_mlp --model-dir runs/flax_mlp --steps 2000

The problem, data and outer loop are `numpy_mlp`'s; the model is Flax NNX code as NNX
users write it: `nnx.Linear` layers, `nnx.BatchNorm`, `nnx.Dropout` drawing from
`nnx.Rngs`, trained by an `nnx.Optimizer` running `optax.adamw` with a warm-up then
cosine-decay learning-rate schedule. The step is NNX's own stateful idiom --
`nnx.value_and_grad(loss_fn)(self.model)`, `self.optimizer.update(self.model, grads)`
-- and the JAX backend runs `steps_per_loop` of them in one `jax.jit(lax.scan)` call:
it carries the NNX objects' variables (parameters, batch statistics, the dropout RNG's
count, the optimizer's moments and step) in the scan and writes them back before
summaries and checkpoints run. Checkpoints hold all of it by path
(`model/l1/kernel`, `model/norm/mean`, `model/drop/rngs/count`,
`optimizer/opt_state/0/mu/l1/kernel`, ...), so a resumed run continues bit for bit
where an uninterrupted one would be, dropout masks included.

The evaluator holds the trainer's model as an attribute (so its compiled loop reads
the current weights, never a copy baked in at its first trace) and calls it with
`train=False`: dropout off, batch statistics read, not updated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

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
    "make_schedule",
    "make_trainer",
]


class MLP(nnx.Module):
    """`n_in -> hidden -> hidden -> 1`: Linear, BatchNorm, ReLU, Dropout, Linear, ReLU, Linear."""

    def __init__(self, n_in: int, hidden: int = 64, dropout: float = 0.1, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(n_in, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # The mode is an argument, not `model.train()`/`model.eval()`: the trainer and
        # the evaluator share the model, and neither has to switch it back.
        h = nnx.relu(self.norm(self.l1(x), use_running_average=not train))
        h = self.drop(h, deterministic=not train)
        y: jax.Array = self.out(nnx.relu(self.l2(h)))
        return y


def make_schedule(peak: float = 3e-3, warmup: int = 100, decay: int = 2000) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `decay`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=peak * 0.01)


class MLPTrainer(looproto.StandardTrainer):
    """AdamW (with a schedule) on the NNX model; reports the loop's mean loss and its LR."""

    def __init__(
        self,
        model: MLP,
        dataset: ArrayDataset,
        schedule: Callable[[Any], Any],
        weight_decay: float = 1e-4,
        options: looproto.StandardTrainerOptions | None = None,
    ):
        super().__init__(train_dataset=dataset, options=options)
        self.model = model
        self.schedule = schedule
        self.optimizer = nnx.Optimizer(
            model, optax.adamw(schedule, weight_decay=weight_decay), wrt=nnx.Param
        )
        self.global_step = looproto.create_global_step()
        with self.name_scope:
            self.loss_sum = looproto.Variable(jnp.float32(0), trainable=False, name="loss_sum")
            self.loss_count = looproto.Variable(jnp.int32(0), trainable=False, name="loss_count")

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(jnp.zeros_like(self.loss_sum.value))
        self.loss_count.assign(jnp.zeros_like(self.loss_count.value))

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)

        def loss_fn(model: MLP) -> jax.Array:
            return jnp.mean((model(batch["x"], train=True) - batch["y"]) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(self.model)
        self.optimizer.update(self.model, grads)
        self.loss_sum.assign_add(loss)
        self.loss_count.assign_add(1)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Mapping[str, Any]:
        # The optimizer's step counts the updates made: the schedule's position.
        learning_rate = self.schedule(self.optimizer.step[...])
        loss = self.loss_sum.value / jnp.maximum(self.loss_count.value, 1)
        out: Mapping[str, Any] = jax_backend.BACKEND.to_host(
            {"loss": loss, "learning_rate": learning_rate}
        )
        return out


class MLPEvaluator(looproto.StandardEvaluator):
    """Mean squared and absolute error of the trainer's model, in one compiled loop."""

    def __init__(self, model: MLP, dataset: ArrayDataset):
        super().__init__(
            eval_dataset=dataset,
            options=looproto.StandardEvaluatorOptions(backend="jax", use_compiled_loop=True),
        )
        self.model = model  # An attribute: the loop carries its current weights.
        with self.name_scope:
            self.squared = looproto.Variable(jnp.float32(0), trainable=False, name="squared")
            self.absolute = looproto.Variable(jnp.float32(0), trainable=False, name="absolute")
            self.count = looproto.Variable(jnp.int32(0), trainable=False, name="count")

    def eval_begin(self) -> None:
        for total in (self.squared, self.absolute, self.count):
            total.assign(jnp.zeros_like(total.value))

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        diff = self.model(batch["x"], train=False) - batch["y"]
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
    seed: int = 0, batch_size: int = 64, data: str = "stack", dropout: float = 0.1
) -> MLPTrainer:
    """The trainer (NNX model, optimizer, shuffled training data) for `seed`.

    Args:
        seed: Seeds the data, the initialisation, the dropout RNG and the shuffling.
        batch_size: Training batch size.
        data: The JAX backend's `data` option: `"stack"` or `"device"`.
        dropout: The dropout rate.
    """
    train = make_data(4096, seed=seed)
    model = MLP(train["x"].shape[1], dropout=dropout, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    dataset = ArrayDataset(
        train, batch_size, shuffle=True, seed=seed, epochs=None, shard=distributed.shard()
    )
    options = looproto.StandardTrainerOptions(backend="jax", backend_options={"data": data})
    return MLPTrainer(model, dataset, make_schedule(), options=options)


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
    return _cli.run("flax_mlp", __doc__.splitlines()[0], make_controller, argv)


if __name__ == "__main__":
    raise SystemExit(main())
