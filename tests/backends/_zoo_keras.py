"""The Keras 3 objects of the state zoo (see `_zoo.py`), on the TensorFlow backend.

Custom `train_step`s over `tf.data`, in the compiled loop (one `tf.function` with a
`tf.while_loop`): models with `Dropout` (a `SeedGenerator`) and `BatchNormalization`,
optimizers whose slots Keras creates at their first `apply` (so the resumed process
restores into an optimizer that is not built yet), learning-rate schedules, metrics,
and a `LossScaleOptimizer` around an inner optimizer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import looproto  # noqa: E402
from tests.backends._zoo import Case  # noqa: E402


def dataset(seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5], [0.3]], np.float32))
    ds = tf.data.Dataset.from_tensor_slices(
        {"x": x, "y": y, "label": (y[:, 0] > 0).astype("int32")}
    )
    return ds.shuffle(48, seed=1).repeat().batch(16)


class KerasTrainer(looproto.StandardTrainer):
    """A custom step: `GradientTape`, `optimizer.apply`, metrics updated in the graph."""

    def __init__(self) -> None:
        keras.utils.set_random_seed(0)
        super().__init__(iter(dataset()))
        self.global_step = looproto.create_global_step()
        self.loss_mean = keras.metrics.Mean("loss")

    def loss(self, batch: Any) -> Any:
        return tf.reduce_mean((self.model(batch["x"], training=True) - batch["y"]) ** 2)

    def train_step(self, iterator: Any) -> Any:
        batch = next(iterator)
        with tf.GradientTape() as tape:
            loss = self.loss(batch)
        variables = self.model.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.loss_mean.update_state(loss)
        self.global_step.assign_add(1)
        return {"loss": loss}


def keras_lrs(trainer: Any) -> list[float]:
    return [float(np.asarray(trainer.optimizer.learning_rate))]


class SequentialAdam(KerasTrainer):
    """`Sequential` with `Dropout` and `BatchNormalization`, Adam on a cosine decay."""

    def __init__(self) -> None:
        super().__init__()
        self.model = keras.Sequential(
            [
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.Dropout(0.3, seed=2),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(1),
            ]
        )
        self.model.build((None, 4))
        schedule = keras.optimizers.schedules.CosineDecay(0.02, decay_steps=20, warmup_steps=3)
        self.optimizer = keras.optimizers.Adam(schedule)


class Encoder(keras.Model):
    """A subclassed model: its layers are attributes, one list of blocks among them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = keras.layers.Dense(16)
        self.blocks = [keras.layers.Dense(16, activation="relu") for _ in range(2)]
        self.dropout = keras.layers.Dropout(0.2, seed=4)
        self.head = keras.layers.Dense(1)

    def call(self, x: Any, training: bool = False) -> Any:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.dropout(h, training=training))


class Subclassed(KerasTrainer):
    """A subclassed model, SGD with momentum inside a `LossScaleOptimizer`, input noise
    from a `SeedGenerator` the trainer holds, and an accuracy metric."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Encoder()
        self.model(np.zeros((1, 4), np.float32))  # Builds its layers.
        self.optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
            initial_scale=2.0**10,
            dynamic_growth_steps=2,
        )
        self.noise = keras.random.SeedGenerator(11)
        self.accuracy = keras.metrics.BinaryAccuracy()

    def loss(self, batch: Any) -> Any:
        x = batch["x"] + 0.05 * keras.random.normal(tf.shape(batch["x"]), seed=self.noise)
        out = self.model(x, training=True)
        self.accuracy.update_state(batch["label"], tf.sigmoid(out[:, 0]))
        return tf.reduce_mean((out - batch["y"]) ** 2)

    def train_step(self, iterator: Any) -> Any:
        batch = next(iterator)
        with tf.GradientTape() as tape:
            loss = self.loss(batch)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_mean.update_state(loss)
        self.global_step.assign_add(1)
        return {"loss": loss}


def scaled_lrs(trainer: Any) -> list[float]:
    return [*keras_lrs(trainer), float(np.asarray(trainer.optimizer.dynamic_scale))]


class Averaging(KerasTrainer):
    """AdamW keeping an exponential moving average of the weights, gradients accumulated
    over two steps, on an exponential decay."""

    def __init__(self) -> None:
        super().__init__()
        self.model = keras.Sequential(
            [keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
        )
        self.model.build((None, 4))
        schedule = keras.optimizers.schedules.ExponentialDecay(0.02, 3, 0.7)
        self.optimizer = keras.optimizers.AdamW(
            schedule,
            weight_decay=0.01,
            use_ema=True,
            ema_momentum=0.9,
            gradient_accumulation_steps=2,
        )


CASES = [
    Case("keras_sequential_adam", SequentialAdam, keras_lrs),
    Case("keras_subclassed_loss_scale", Subclassed, scaled_lrs),
    Case("keras_adamw_ema_accumulation", Averaging, keras_lrs),
]
