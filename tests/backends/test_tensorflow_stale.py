"""The TensorFlow backend refuses stale reads: a compiled step reading a NumPy
`looproto.Variable` its loop did not lift raises at trace time, instead of baking the
Variable's value into the graph as a constant."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto.errors import StaleReadError  # noqa: E402

W_TRUE = np.array([[1.0], [-2.0], [0.5]], np.float32)


def make_data(seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(256, 3)).astype(np.float32)
    return {"x": x, "y": x @ W_TRUE}


class Regression(looproto.StandardTrainer):
    """Linear regression by SGD; `w` is a NumPy `looproto.Variable` (lifted by the loop)."""

    def __init__(self) -> None:
        dataset = tf.data.Dataset.from_tensor_slices(make_data(0)).batch(32).repeat()
        super().__init__(dataset, options=looproto.StandardTrainerOptions(backend="tensorflow"))
        self.w = looproto.Variable(np.zeros((3, 1), np.float32), name="w")
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((batch["x"] @ self.w.value - batch["y"]) ** 2)
        self.w.assign(self.w.value - 0.1 * tape.gradient(loss, self.w.value))
        self.global_step.assign_add(1)


class LossEvaluator(looproto.StandardEvaluator):
    """Mean squared error of `self.predict` over held-out data, in `tf.function`s."""

    def __init__(self) -> None:
        dataset = tf.data.Dataset.from_tensor_slices(make_data(1)).batch(64)
        super().__init__(dataset, options=looproto.StandardEvaluatorOptions(backend="tensorflow"))

    def eval_begin(self) -> list[float]:
        return []

    def eval_step(self, iterator: Any) -> Any:
        batch = next(iterator)
        return {"loss": tf.reduce_mean((self.predict(batch["x"]) - batch["y"]) ** 2)}

    def eval_reduce(self, state: list[float], output: Any) -> list[float]:
        return [*state, float(output["loss"])]

    def eval_end(self, state: list[float]) -> dict[str, float]:
        return {"loss": float(np.mean(state))}


def test_a_closure_over_another_trainers_variable_raises_at_trace_time() -> None:
    trainer = Regression()
    stale = LossEvaluator()
    stale.predict = lambda x: x @ trainer.w.value  # `trainer` is not reachable from it
    with pytest.raises(StaleReadError, match=r"'w:0'.*did not lift it.*closure.*self\.model"):
        stale.evaluate(-1)


def test_an_evaluator_holding_the_trainer_reads_its_current_weights() -> None:
    trainer = Regression()

    def held() -> LossEvaluator:
        evaluator = LossEvaluator()
        evaluator.trainer = trainer
        evaluator.predict = lambda x: x @ evaluator.trainer.w.value
        return evaluator

    evaluator = held()
    before = evaluator.evaluate(-1)["loss"]
    trainer.train(100)
    after = evaluator.evaluate(-1)["loss"]
    assert evaluator._eval_loop_fn.trace_count == 1  # The same traced function...
    assert after < 1e-3 * before  # ...reads the trained weights,
    assert after == pytest.approx(held().evaluate(-1)["loss"], rel=1e-6)  # as a new one does.


def test_a_pytree_variable_is_not_lifted_and_reading_it_raises() -> None:
    class TreeReader(Regression):
        def __init__(self) -> None:
            super().__init__()
            self.extra = looproto.Variable({"scale": np.float32(2.0)}, trainable=False)

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)
            self.w.assign(self.w.value + 0 * self.extra.value["scale"] * batch["x"][0, 0])

    with pytest.raises(StaleReadError, match="lifts Variables holding one NumPy array, not a tree"):
        TreeReader().train(2)
