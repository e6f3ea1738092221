"""Summaries from inside steps, and optimizers' hyper-parameters, read back from event files.

`looproto.summary.scalar/histogram` in a compiled step on every backend lands in the
train (or eval) event files at multiples of `summary_interval`, with the value of the
step the summary is written at. `LearningRateMonitor` writes each optimizer's learning
rate as the framework's own scheduler computes it: torch's `LambdaLR` warm-up/cosine on
AdamW, an optax schedule through `inject_hyperparams`, a Keras `CosineDecay`, and a
`looproto.schedules` one on a portable optimizer.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import portable, schedules
from looproto.actions import LearningRateMonitor, hyperparameters
from looproto.data import ArrayDataset
from tests.helpers import scalars

BACKENDS = ["numpy", "jax", "tensorflow", "torch"]
OPTIONS: dict[str, dict[str, Any]] = {"torch": {"backend": "eager", "fullgraph": True}}
X = np.arange(48, dtype=np.float32).reshape(16, 3)


def _needs(backend: str) -> None:
    if backend != "numpy" and importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")


def _controller(trainer: Any, tmp_path: Path, evaluator: Any = None) -> looproto.Controller:
    return looproto.Controller(
        trainer=trainer,
        evaluator=evaluator,
        global_step=trainer.global_step,
        steps_per_loop=2,
        summary_interval=4,
        summary_dir=tmp_path / "train",
        eval_summary_dir=tmp_path / "eval",
        preemption_signals=None,
    )


class Recording(looproto.StandardTrainer, looproto.StandardEvaluator):
    """Records the first feature of each batch, and the batch, from inside its steps."""

    __test__ = False

    def __init__(self, backend: str) -> None:
        options = {"backend": backend, "backend_options": OPTIONS.get(backend, {})}
        data = ArrayDataset({"x": X}, 2)
        looproto.StandardTrainer.__init__(
            self, data, options=looproto.StandardTrainerOptions(**options)
        )
        looproto.StandardEvaluator.__init__(
            self,
            ArrayDataset({"x": X}, 4),
            options=looproto.StandardEvaluatorOptions(use_compiled_loop=True, **options),
        )
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)["x"]
        looproto.summary.scalar("first", batch[0, 0])
        looproto.summary.histogram("batch", batch)
        self.global_step.assign_add(1)

    def eval_step(self, iterator: Any) -> None:
        looproto.summary.scalar("eval_first", next(iterator)["x"][0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_step_summaries_land_at_multiples_of_summary_interval(
    backend: str, tmp_path: Path
) -> None:
    _needs(backend)
    trainer = Recording(backend)
    with _controller(trainer, tmp_path, evaluator=trainer) as controller:
        controller.train_and_evaluate(train_steps=8, eval_steps=-1, eval_interval=8)
    train = scalars(tmp_path / "train")
    # Step s ran batch s - 1 (rows 2(s-1), 2(s-1)+1); its first value is X[2(s-1), 0].
    assert train["first"] == [(4, float(X[6, 0])), (8, float(X[14, 0]))]
    histograms = dict(train["batch"])
    assert sorted(histograms) == [4, 8]
    assert histograms[8]["num"] == 6 and histograms[8]["sum"] == float(X[14:16].sum())
    assert histograms[8]["max"] == float(X[15, 2])
    # The eval steps' summaries go to the eval run, with the evaluation's last step.
    assert scalars(tmp_path / "eval")["eval_first"] == [(8, float(X[12, 0]))]


def test_an_in_step_summary_may_not_shadow_an_output(tmp_path: Path) -> None:
    class Clash(Recording):
        __test__ = False

        def train_loop_end(self) -> dict[str, Any]:
            return {"first": 1.0}

    with pytest.raises(looproto.ProtocolError, match=r"\['first'\] have the names of keys"):
        _controller(Clash("numpy"), tmp_path).train(4)
    with pytest.raises(looproto.ProtocolError, match=r"non-empty string.*name=3"):
        looproto.summary.scalar(3, 1.0)  # type: ignore[arg-type]


def test_an_until_the_end_evaluation_does_not_announce_its_end_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("jax")

    class Evaluator(looproto.StandardEvaluator):
        def __init__(self) -> None:
            super().__init__(
                ArrayDataset({"x": X}, 4),
                options=looproto.StandardEvaluatorOptions(backend="jax"),
            )

        def eval_step(self, iterator: Any) -> None:
            next(iterator)

    with caplog.at_level(logging.INFO, logger="looproto"):
        Evaluator().evaluate(-1)
    assert not [r for r in caplog.records if "exhausted" in r.getMessage()]


# ----------------------------------------------------------------------------
# LearningRateMonitor


def _warmup_cosine(step: int, warmup: int = 3, total: int = 12) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_torch_learning_rates_in_tensorboard_equal_the_schedulers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            options = looproto.StandardTrainerOptions(
                backend="torch", backend_options={"backend": "eager"}
            )
            super().__init__(ArrayDataset({"x": X}, 2, epochs=None), options=options)
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": self.model[0].parameters()},
                    {"params": self.model[1].parameters(), "lr": 0.01},
                ],
                lr=0.1,
                weight_decay=0.05,
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine)
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            loss = self.model(next(iterator)["x"]).pow(2).mean()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.global_step.assign_add(1)

    trainer = Trainer()
    monitor = LearningRateMonitor(trainer.scheduler)
    controller = _controller(trainer, tmp_path)
    controller.train_actions = (monitor,)
    # Bound to the controller's train actions after the fact: the monitor needs no binding.
    with controller:
        controller.train(12)
    train = scalars(tmp_path / "train")
    # After s steps the scheduler has set the rate of step s + 1: base * lambda(s).
    expected = [(s, 0.1 * _warmup_cosine(s)) for s in (4, 8, 12)]
    assert [s for s, _ in train["learning_rate"]] == [4, 8, 12]
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], [v for _, v in expected])
    np.testing.assert_allclose(
        [v for _, v in train["learning_rate/group_1"]], [v / 10 for _, v in expected], rtol=1e-6
    )
    assert train["learning_rate"][-1][1] == pytest.approx(trainer.scheduler.get_last_lr()[0])
    np.testing.assert_allclose([v for _, v in train["weight_decay"]], [0.05] * 3)
    np.testing.assert_allclose([v for _, v in train["beta_2"]], [0.999] * 3)


def test_optax_learning_rates_in_tensorboard_equal_the_schedules(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=3, decay_steps=12)

    class Trainer(looproto.StandardTrainer):
        """Parameters and optax state in `looproto.Variable`s: lifted into the scan."""

        def __init__(self) -> None:
            super().__init__(
                ArrayDataset({"x": X}, 2, epochs=None),
                options=looproto.StandardTrainerOptions(backend="jax"),
            )
            self.w = looproto.Variable(np.ones((3, 1), np.float32))
            self.tx = optax.inject_hyperparams(optax.adamw)(
                learning_rate=schedule, weight_decay=0.01
            )
            state = self.tx.init(jnp.asarray(self.w.value))
            self.opt_state = jax.tree.map(
                lambda a: looproto.Variable(np.asarray(a), trainable=False), state
            )
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            x = next(iterator)["x"]
            grads = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(self.w.value)
            state = jax.tree.map(lambda v: v.value, self.opt_state)
            updates, state = self.tx.update(grads, state, self.w.value)
            self.w.assign(optax.apply_updates(self.w.value, updates))
            jax.tree.map(lambda v, a: v.assign(a), self.opt_state, state)
            self.global_step.assign_add(1)

    trainer = Trainer()
    controller = _controller(trainer, tmp_path)
    controller.train_actions = (LearningRateMonitor({"adamw": trainer.opt_state}),)
    with controller:
        controller.train(12)
    train = scalars(tmp_path / "train")
    # optax records the rate of the update it last applied: the schedule at count - 1.
    got = train["adamw/learning_rate"]
    assert [s for s, _ in got] == [4, 8, 12]
    np.testing.assert_allclose([v for _, v in got], [schedule(s - 1) for s in (4, 8, 12)])
    np.testing.assert_allclose([v for _, v in train["adamw/weight_decay"]], [0.01] * 3)


def test_keras_learning_rates_in_tensorboard_equal_the_schedules(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend here")
    import tensorflow as tf

    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=9, warmup_target=0.1, warmup_steps=3
    )

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(
                tf.data.Dataset.from_tensor_slices({"x": X}).batch(2).repeat(),
                options=looproto.StandardTrainerOptions(backend="tensorflow"),
            )
            self.w = keras.Variable(np.ones((3, 1), np.float32))
            self.optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.5)
            self.optimizer.build([self.w])
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def train_step(self, iterator: Any) -> None:
            x = next(iterator)["x"]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((x @ self.w) ** 2)
            grads = tape.gradient(loss, [self.w])
            self.optimizer.apply_gradients(zip(grads, [self.w]))
            self.global_step.assign_add(1)

    trainer = Trainer()
    controller = _controller(trainer, tmp_path)
    controller.train_actions = (LearningRateMonitor(trainer.optimizer),)
    with controller:
        controller.train(12)
    train = scalars(tmp_path / "train")
    # Keras evaluates its schedule at `iterations`: the rate of the next step.
    expected = [float(schedule(s)) for s in (4, 8, 12)]
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], expected, rtol=1e-6)
    assert {v for _, v in train["momentum"]} == {0.5}


def test_portable_learning_rates_in_tensorboard_equal_the_schedules(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    schedule = schedules.cosine_decay(peak=0.1, decay_steps=12, warmup_steps=3)

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(
                ArrayDataset({"x": X}, 2, epochs=None),
                options=looproto.StandardTrainerOptions(backend="jax"),
            )
            self.model = looproto.Module(name="model")
            self.model.w = looproto.Variable(np.ones((3, 1), np.float32))
            self.optimizer = portable.SGD(
                self.model, learning_rate=schedule, momentum=0.9, global_clipnorm=1.0
            )
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            x = next(iterator)["x"]

            def loss() -> Any:
                xp = portable.array_namespace(x)
                return xp.mean((x @ self.model.w.value) ** 2)

            _, grads = portable.value_and_grad(loss, self.model, backend="jax")
            self.optimizer.apply(grads)
            self.global_step.assign_add(1)

    trainer = Trainer()
    controller = _controller(trainer, tmp_path)
    controller.train_actions = (LearningRateMonitor(trainer.optimizer, names=["learning_rate"]),)
    with controller:
        controller.train(12)
    train = scalars(tmp_path / "train")
    assert sorted(train) == ["learning_rate", "steps_per_second"]
    expected = [float(schedule(s)) for s in (4, 8, 12)]
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], expected, rtol=1e-6)
    assert int(trainer.optimizer.iterations.numpy()) == 12


def test_an_unknown_optimizer_is_a_protocol_error_naming_it() -> None:
    with pytest.raises(looproto.ProtocolError, match=r"'adam' of type str is not an optimizer"):
        hyperparameters("adam")
    with pytest.raises(looproto.ConfigError, match=r"`optimizers` is an empty mapping"):
        LearningRateMonitor({})
