"""Keras 3 `model.fit` contenders, on whichever backend `KERAS_BACKEND` selects.

Each framework's benchmark process sets `KERAS_BACKEND` to its framework before
importing Keras, so `fit` runs beside looproto and the hand-written loop in the
same process. A round runs `fit` for twice the steps of one loop and reports the
time of the second half, measured by a callback: that is `fit`'s steady state,
without the few milliseconds each `fit` call spends setting up (reported apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import _workloads


def available() -> bool:
    """Whether Keras imports on this process's backend."""
    try:
        import keras  # noqa: F401
    except ImportError:
        return False
    return True


def model(workload: _workloads.Workload, steps_per_execution: int) -> Any:
    """The workload's MLP as a compiled Keras model, with the shared initial weights."""
    import keras

    sizes = workload.sizes
    layers: list[Any] = [keras.Input((sizes[0],))]
    for i, n_out in enumerate(sizes[1:]):
        last = i == len(sizes) - 2
        layers.append(keras.layers.Dense(n_out, activation=None if last else "relu"))
    net = keras.Sequential(layers)
    net.set_weights(workload.params())
    loss = (
        "mse"
        if workload.loss == "mse"
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    net.compile(
        optimizer=keras.optimizers.SGD(workload.learning_rate),
        loss=loss,
        steps_per_execution=steps_per_execution,
    )
    return net


def contender(
    workload: _workloads.Workload, steps: int, steps_per_execution: int
) -> tuple[Callable[[], float], Callable[[], float]]:
    """`(steady, per_call)`: `fit` timed by a callback in steady state, and one whole
    `fit` call of `steps` steps timed from outside (set-up included)."""
    import keras

    net = model(workload, steps_per_execution)
    xs, ys = zip(*workload.batches())
    reps = -(-2 * steps // len(xs))
    x = np.concatenate(xs * reps)
    y = np.concatenate(ys * reps)
    stamps: list[float] = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            stamps.append(time.perf_counter())

    stamp = Stamp()

    def steady() -> float:
        stamps.clear()
        net.fit(x, y, batch_size=workload.batch, epochs=1, steps_per_epoch=2 * steps,
                shuffle=False, verbose=0, callbacks=[stamp])  # fmt: skip
        half = len(stamps) // 2
        return stamps[-1] - stamps[half - 1]

    def per_call() -> float:
        start = time.perf_counter()
        net.fit(x, y, batch_size=workload.batch, epochs=1, steps_per_epoch=steps,
                shuffle=False, verbose=0)  # fmt: skip
        return time.perf_counter() - start

    return steady, per_call
