"""Small concrete runners, one per shape of implementation (Orbit's test fixtures, in NumPy)."""

from __future__ import annotations

from typing import Any

import numpy as np

import looproto
from looproto.data import ArrayDataset


def regression_data(num_batches: int = 100, batch: int = 10, seed: int = 0) -> dict[str, Any]:
    """`num_batches` batches of a linear regression problem (x: 3 features, y: 4 targets)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_batches * batch, 3)).astype(np.float32)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    return {"x": x, "y": (x @ w).astype(np.float32)}


class TestRunner(looproto.StandardTrainer, looproto.StandardEvaluator):
    """A dense 3->4 model trained with SGD; both trainer and evaluator (Orbit's TestRunner)."""

    __test__ = False  # not a pytest class

    def __init__(self, *, epochs: int | None = None, learning_rate: float = 0.05) -> None:
        data = regression_data()
        looproto.StandardTrainer.__init__(self, ArrayDataset(data, 10, epochs=epochs))
        looproto.StandardEvaluator.__init__(self, ArrayDataset(data, 10))
        rng = np.random.default_rng(1)
        with self.name_scope:
            self.w = looproto.Variable(rng.normal(size=(3, 4)).astype(np.float32), name="w")
            self.b = looproto.Variable(np.zeros(4, np.float32), name="b")
        self.global_step = looproto.create_global_step()
        self.learning_rate = learning_rate
        self.train_loss = looproto.Variable(np.float32(0), trainable=False)
        self.eval_loss = looproto.Variable(np.float32(0), trainable=False)
        self.eval_count = 0
        self.train_calls: list[int] = []

    def _loss_and_grads(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        diff = batch["x"] @ self.w.value + self.b.value - batch["y"]
        loss = np.mean(diff**2)
        g = 2.0 * diff / diff.size
        return loss, batch["x"].T @ g, g.sum(axis=0)

    def train_loop_begin(self) -> None:
        self.train_calls.append(int(self.global_step))

    def train_step(self, iterator: Any) -> None:
        loss, gw, gb = self._loss_and_grads(next(iterator))
        self.w.assign(self.w.value - self.learning_rate * gw)
        self.b.assign(self.b.value - self.learning_rate * gb)
        self.train_loss.assign(loss)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.train_loss.numpy()}

    def eval_begin(self) -> None:
        self.eval_loss.assign(0.0)
        self.eval_count = 0

    def eval_step(self, iterator: Any) -> None:
        loss, _, _ = self._loss_and_grads(next(iterator))
        self.eval_loss.assign_add(loss)
        self.eval_count += 1

    def eval_end(self, *args: Any) -> dict[str, Any]:
        return {"eval_loss": self.eval_loss.numpy() / max(self.eval_count, 1)}


class TestEvaluator(looproto.StandardEvaluator):
    """Keeps a Python list as reduce state (Orbit's TestEvaluator)."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__(ArrayDataset(regression_data(), 10))
        self.w = looproto.Variable(np.ones((3, 4), np.float32), name="w")

    def eval_begin(self) -> list[float]:
        return []

    def eval_step(self, iterator: Any) -> float:
        batch = next(iterator)
        return float(np.mean((batch["x"] @ self.w.value - batch["y"]) ** 2))

    def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
        state.append(step_outputs)
        return state

    def eval_end(self, *args: Any) -> dict[str, Any]:
        (outputs,) = args
        return {"eval_loss": float(np.mean(outputs))}


class TestEvaluatorNoOutput(looproto.AbstractEvaluator):
    """Returns None from `evaluate`."""

    __test__ = False

    def evaluate(self, num_steps: int) -> None:
        return None


class TestEvaluatorWithNestedSummary(looproto.StandardEvaluator):
    """Evaluates two datasets; returns a nested output (Orbit's fixture)."""

    __test__ = False

    def __init__(self) -> None:
        data = regression_data()
        super().__init__({"dataset": ArrayDataset(data, 10), "dataset2": ArrayDataset(data, 20)})
        self.counts = {"dataset": 0, "dataset2": 0}

    def eval_begin(self) -> None:
        self.counts = {"dataset": 0, "dataset2": 0}

    def eval_step(self, iterator: Any) -> None:
        for key, it in iterator.items():
            next(it)
            self.counts[key] += 1

    def eval_end(self, *args: Any) -> dict[str, Any]:
        return {
            key: {"loss": np.float32(count), "accuracy": np.float32(1.0 / (1 + count))}
            for key, count in self.counts.items()
        }


def scalars(logdir: Any, run: str = ".") -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` of one run (directory) as TensorBoard sees it."""
    from looproto._events import read_events

    return read_events(logdir).get(run, {})


def tensorboard_scalars(run_dir: Any) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` of one run as TensorBoard's own reader shows it.

    Unlike `scalars`, this applies TensorBoard's purging: events at steps >= a
    `SessionLog.START`'s step in earlier files of the run are dropped
    (`SummaryManager(purge_step=...)`).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def checkpoint_contents(checkpoint_dir: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays and object states of the newest checkpoint in `checkpoint_dir`."""
    from pathlib import Path

    import orbax.checkpoint as ocp

    meta = looproto.checkpoint.read_metadata(checkpoint_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = checkpointer.restore(Path(checkpoint_dir) / str(meta["step"]) / "state")
    return arrays, meta["objects"]


def assert_same_positions(backend: str, objects: dict[str, Any], expected: dict[str, Any]) -> None:
    """The saved object states (data positions, RNGs) of the MLP example are the same."""
    if backend == "tensorflow":
        # TensorFlow's iterator serialisation is not canonical (two iterators at the same
        # position can write different bytes): compare the batches each state yields next.
        assert objects.keys() == expected.keys()
        assert _next_tf_batches(objects) == _next_tf_batches(expected)
    else:
        assert objects == expected


def _next_tf_batches(objects: dict[str, Any]) -> list[list[float]]:
    """The next 3 batches of the TF example's data pipeline at the saved position."""
    from looproto.backends.tensorflow import TfDataIteratorState
    from looproto.examples import mlp

    iterator = mlp.trainer("tensorflow")._train_iter
    TfDataIteratorState(iterator).set_state(objects["_train_iter"]["state"])
    return [next(iterator)["x"].numpy().ravel().tolist() for _ in range(3)]
