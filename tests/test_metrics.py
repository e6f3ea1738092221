"""`looproto.metrics`: values equal a hand computation on every backend, inside compiled loops.

Each backend runs the same trainer (and evaluator) with the same batches; the metrics'
results are compared with NumPy computations over those batches. The frameworks' own
metrics (torchmetrics, Keras, Flax NNX) are reset and reported the same way.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import metrics
from looproto.checkpoint import CheckpointManager
from looproto.data import ArrayDataset

BACKENDS = ["numpy", "jax", "tensorflow", "torch"]
# Dynamo without inductor's code generation: the same graphs, compiled in seconds.
OPTIONS: dict[str, dict[str, Any]] = {"torch": {"backend": "eager", "fullgraph": True}}

rng = np.random.default_rng(7)
X = rng.normal(size=(24, 3)).astype(np.float32)
LABELS = rng.integers(0, 3, size=24).astype(np.int64)
WEIGHTS = rng.uniform(0.5, 2.0, size=24).astype(np.float32)
BATCH = 4


def _needs(backend: str) -> None:
    if backend != "numpy" and importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")


def _data() -> ArrayDataset:
    return ArrayDataset({"x": X, "label": LABELS, "weight": WEIGHTS}, BATCH)


def _table() -> dict[str, metrics.Metric]:
    return {
        "mean": metrics.Mean(),
        "weighted": metrics.Mean(),
        "sum": metrics.Sum(),
        "accuracy": metrics.Accuracy(),
        "binary": metrics.Accuracy(threshold=0.0),
        "last": metrics.Last(),
        "low": metrics.Min(),
        "high": metrics.Max(),
    }


def _update(table: dict[str, metrics.Metric], batch: dict[str, Any]) -> None:
    x, label, weight = batch["x"], batch["label"], batch["weight"]
    table["mean"].update(x)
    table["weighted"].update(x[:, 0], sample_weight=weight)
    table["sum"].update(x[:, 1])
    table["accuracy"].update(label, x)  # scores: argmax over the 3 columns
    table["binary"].update(label % 2, x[:, 2])  # binary scores of the labels' shape
    table["last"].update(x[0, 0])
    table["low"].update(x)
    table["high"].update(x)


def _expected(rows: slice) -> dict[str, float]:
    """The metrics over the examples `rows`, computed here with NumPy."""
    x, label, weight = X[rows], LABELS[rows], WEIGHTS[rows]
    return {
        "mean": float(x.mean()),
        "weighted": float((x[:, 0] * weight).sum() / weight.sum()),
        "sum": float(x[:, 1].sum()),
        "accuracy": float((x.argmax(-1) == label).mean()),
        "binary": float(((x[:, 2] > 0).astype(int) == label % 2).mean()),
        "last": float(x[-BATCH, 0]),
        "low": float(x.min()),
        "high": float(x.max()),
    }


class MetricTrainer(looproto.StandardTrainer, looproto.StandardEvaluator):
    __test__ = False

    def __init__(self, backend: str) -> None:
        options = {"backend": backend, "backend_options": OPTIONS.get(backend, {})}
        looproto.StandardTrainer.__init__(
            self, _data(), options=looproto.StandardTrainerOptions(**options)
        )
        looproto.StandardEvaluator.__init__(
            self,
            _data(),
            options=looproto.StandardEvaluatorOptions(use_compiled_loop=True, **options),
        )
        self.global_step = looproto.create_global_step()
        self.train_metrics = _table()
        self.eval_metrics = {"eval_mean": metrics.Mean(), "eval_accuracy": metrics.Accuracy()}

    def train_step(self, iterator: Any) -> None:
        _update(self.train_metrics, next(iterator))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"steps_seen": self.global_step.numpy()}

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        self.eval_metrics["eval_mean"].update(batch["x"])
        self.eval_metrics["eval_accuracy"].update(batch["label"], batch["x"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_metric_values_equal_a_hand_computation_on_every_backend(backend: str, tmp_path) -> None:
    _needs(backend)
    trainer = MetricTrainer(backend)
    first = trainer.train(2)
    second = trainer.train(3)
    # Reset before each inner loop: each output covers its own loop's batches only.
    for output, rows in ((first, slice(0, 8)), (second, slice(8, 20))):
        expected = _expected(rows)
        assert sorted(output) == sorted([*expected, "steps_seen"])
        for name, value in expected.items():
            np.testing.assert_allclose(output[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(second["steps_seen"]) == 5  # the hook's own keys are kept

    evaluated = trainer.evaluate(-1)
    np.testing.assert_allclose(evaluated["eval_mean"], X.mean(), rtol=1e-5)
    np.testing.assert_allclose(evaluated["eval_accuracy"], (X.argmax(-1) == LABELS).mean())

    # The metrics' state is the trainer's: checkpointed, restored into a fresh one.
    manager = CheckpointManager(tmp_path, trainer)
    manager.save(5)
    fresh = MetricTrainer(backend)
    CheckpointManager(tmp_path, fresh).restore_or_initialize()
    for name, metric in trainer.train_metrics.items():
        restored, saved = fresh.train_metrics[name].state(), metric.state()
        assert restored.keys() == saved.keys()
        for key in saved:
            np.testing.assert_array_equal(restored[key], saved[key], err_msg=f"{name}/{key}")
    np.testing.assert_allclose(fresh.train_metrics["sum"].result(), second["sum"], rtol=1e-6)


def test_a_metric_of_no_values_is_nan_and_reset_empties_it() -> None:
    mean, low, last = metrics.Mean(), metrics.Min(), metrics.Last(shape=(2,))
    assert np.isnan(mean.result()) and np.isnan(low.result())
    assert np.isnan(last.result()).all()
    mean.update([1.0, 3.0])
    low.update(np.array([4.0, -2.0]))
    last.update(np.array([1.0, 2.0]))
    assert (float(mean.result()), float(low.result())) == (2.0, -2.0)
    np.testing.assert_array_equal(last.result(), [1.0, 2.0])
    metrics.reset({"mean": mean, "low": low, "last": last})
    assert np.isnan(mean.result()) and np.isnan(low.result())


def test_metrics_merge_their_state_by_each_states_reduction() -> None:
    mean, high, last = metrics.Mean(), metrics.Max(), metrics.Last()
    merged = mean.merge([{"total": 3.0, "count": 2.0}, {"total": 5.0, "count": 2.0}])
    assert float(mean.compute(merged)) == 2.0
    merged = high.merge([{"value": 1.0, "count": 1.0}, {"value": 4.0, "count": 3.0}])
    assert float(high.compute(merged)) == 4.0
    merged = last.merge([{"value": 1.0, "count": 1.0}, {"value": 3.0, "count": 1.0}])
    assert float(last.compute(merged)) == 2.0  # the processes' last values, averaged


def test_bad_metrics_are_named_with_what_was_expected() -> None:
    class Trainer(looproto.StandardTrainer):
        def __init__(self, table: Any) -> None:
            super().__init__(train_dataset=None)
            self.global_step = looproto.create_global_step()
            self.train_metrics = table

        def train_step(self, iterator: Any) -> None:
            self.global_step.assign_add(1)

    with pytest.raises(looproto.ConfigError, match=r"`train_metrics` must be a mapping.*distinct"):
        Trainer([metrics.Mean(), metrics.Mean()]).train(1)  # two named "mean"
    listed = Trainer([metrics.Mean(name="loss"), metrics.Max(name="peak")])
    assert sorted(listed.train(1)) == ["loss", "peak"]  # a list is named by `name`s
    with pytest.raises(looproto.ProtocolError, match=r"'loss'.*is not a metric looproto knows"):
        Trainer({"x": "loss"}).train(1)
    with pytest.raises(looproto.ConfigError, match=r"`dtype` must be a floating-point dtype"):
        metrics.Mean(dtype=np.int32)
    with pytest.raises(looproto.ConfigError, match=r"`sync` must be a bool or None"):
        metrics.Sum(sync="yes")  # type: ignore[arg-type]
    with pytest.raises(looproto.ProtocolError, match=r"labels' shape \(3,\).*\(3, 2, 2\)"):
        metrics.Accuracy().update(np.zeros(3), np.zeros((3, 2, 2)))


# ----------------------------------------------------------------------------
# The frameworks' own metrics: discovered in the same mapping, reset, summarised


def test_torchmetrics_are_reset_and_reported() -> None:
    torch = pytest.importorskip("torch")
    torchmetrics = pytest.importorskip("torchmetrics")

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            options = looproto.StandardTrainerOptions(
                backend="torch", backend_options={"backend": "eager"}
            )
            super().__init__(_data(), options=options)
            self.global_step = looproto.create_global_step()
            self.train_metrics = {
                "accuracy": torchmetrics.classification.MulticlassAccuracy(
                    num_classes=3, average="micro"
                ),
                "scores": torchmetrics.MetricCollection(
                    {"mean": torchmetrics.MeanMetric(), "high": torchmetrics.MaxMetric()}
                ),
                "own": metrics.Mean(),
            }

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)
            self.train_metrics["accuracy"].update(batch["x"], batch["label"])
            self.train_metrics["scores"].update(batch["x"])
            self.train_metrics["own"].update(batch["x"])
            self.global_step.assign_add(1)

    trainer = Trainer()
    trainer.train(2)
    output = trainer.train(2)  # reset in between: batches 2 and 3 only
    rows = slice(8, 16)
    assert isinstance(trainer.train_metrics["scores"]["mean"].mean_value, torch.Tensor)
    np.testing.assert_allclose(output["accuracy"], (X[rows].argmax(-1) == LABELS[rows]).mean())
    np.testing.assert_allclose(output["scores"]["mean"], X[rows].mean(), rtol=1e-6)
    np.testing.assert_allclose(output["scores"]["high"], X[rows].max(), rtol=1e-6)
    np.testing.assert_allclose(output["own"], X[rows].mean(), rtol=1e-6)


def test_keras_metrics_are_reset_and_reported_on_tensorflow() -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend here")

    class Evaluator(looproto.StandardEvaluator):
        def __init__(self) -> None:
            super().__init__(
                _data(),
                options=looproto.StandardEvaluatorOptions(
                    backend="tensorflow", use_compiled_loop=True
                ),
            )
            self.global_step = looproto.create_global_step()
            self.eval_metrics = {
                "accuracy": keras.metrics.SparseCategoricalAccuracy(),
                "mean": keras.metrics.Mean(),
            }

        def eval_step(self, iterator: Any) -> None:
            batch = next(iterator)
            self.eval_metrics["accuracy"].update_state(batch["label"], batch["x"])
            self.eval_metrics["mean"].update_state(batch["x"])

    evaluator = Evaluator()
    evaluator.evaluate(2)
    output = evaluator.evaluate(-1)  # reset: the whole dataset once
    np.testing.assert_allclose(output["accuracy"], (X.argmax(-1) == LABELS).mean(), rtol=1e-6)
    np.testing.assert_allclose(output["mean"], X.mean(), rtol=1e-5)


def test_flax_nnx_metrics_are_reset_and_reported() -> None:
    pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")

    class Evaluator(looproto.StandardEvaluator):
        def __init__(self) -> None:
            # NNX variables are not lifted into compiled loops: an eager step.
            super().__init__(
                _data(),
                options=looproto.StandardEvaluatorOptions(backend="jax", use_compiled_step=False),
            )
            self.global_step = looproto.create_global_step()
            self.eval_metrics = {
                "both": nnx.MultiMetric(
                    accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss")
                )
            }

        def eval_step(self, iterator: Any) -> None:
            batch = next(iterator)
            self.eval_metrics["both"].update(
                logits=batch["x"], labels=batch["label"], loss=batch["x"][:, 0]
            )

    evaluator = Evaluator()
    evaluator.evaluate(1)
    output = evaluator.evaluate(-1)
    np.testing.assert_allclose(output["both"]["accuracy"], (X.argmax(-1) == LABELS).mean())
    np.testing.assert_allclose(output["both"]["loss"], X[:, 0].mean(), rtol=1e-6)
