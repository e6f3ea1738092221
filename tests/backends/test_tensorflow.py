"""The TensorFlow backend: Orbit's tf.function + tf.while_loop inner loop, under tf.distribute."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto import backends, testing  # noqa: E402
from looproto.backends import tensorflow as tf_backend  # noqa: E402
from looproto.errors import ConfigError, ProtocolError, ShapeError  # noqa: E402
from looproto.module import variable_to_numpy, variables_by_path  # noqa: E402

BACKEND = backends.get("tensorflow")
LR = 0.1
SIZES = (4, 8, 1)


def make_data(n: int = 96, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    return x, y


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(scale=0.5, size=SIZES[:2]).astype(np.float32),
        "b1": np.zeros(SIZES[1], np.float32),
        "w2": rng.normal(scale=0.5, size=SIZES[1:]).astype(np.float32),
        "b2": np.zeros(SIZES[2], np.float32),
    }


def forward(p: dict[str, Any], x: Any) -> Any:
    return tf.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


class MLP(looproto.Module):
    def __init__(self) -> None:
        super().__init__()
        with self.name_scope:
            for key, value in init_params().items():
                setattr(self, key, tf.Variable(value, name=key))

    def params(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in init_params()}


class Trainer(looproto.StandardTrainer):
    """SGD on an MLP of tf.Variables. Gradients are all-reduced, so replicas stay in sync."""

    def __init__(self, dataset: Any, **backend_options: Any) -> None:
        options = looproto.StandardTrainerOptions(backend_options=backend_options)
        super().__init__(dataset, options=options)
        self.model = MLP()
        self.global_step = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.loss = tf.Variable(
            0.0, trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
        )

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        params = self.model.params()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((forward(params, x) - y) ** 2)
        names = list(params)
        grads = tape.gradient(loss, [params[k] for k in names])
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
        loss = context.all_reduce(tf.distribute.ReduceOp.MEAN, loss)
        for key, grad in zip(names, grads):
            params[key].assign_sub(LR * grad)
        self.loss.assign(loss)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> dict[str, Any]:
        return {"loss": self.loss}


def dataset(batch: int = 8, repeat: bool = True) -> Any:
    ds = tf.data.Dataset.from_tensor_slices(make_data()).batch(batch)
    return ds.repeat() if repeat else ds


def model_params(trainer: Trainer) -> dict[str, np.ndarray]:
    return {key: variable_to_numpy(value) for key, value in trainer.model.params().items()}


def reference(steps: int, batch: int = 8) -> dict[str, np.ndarray]:
    """A hand-written tf.function + tf.range loop over the same data."""
    params = {key: tf.Variable(value) for key, value in init_params().items()}
    iterator = iter(dataset(batch))

    @tf.function
    def loop(n: Any) -> None:
        for _ in tf.range(n):
            x, y = next(iterator)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((forward(params, x) - y) ** 2)
            for key, grad in zip(params, tape.gradient(loss, list(params.values()))):
                params[key].assign_sub(LR * grad)

    loop(tf.constant(steps, tf.int64))
    return {key: value.numpy() for key, value in params.items()}


# -- discovery and names -------------------------------------------------------------------


def test_variables_are_discovered_with_paths_flags_and_scoped_names() -> None:
    trainer = Trainer(dataset())
    paths = variables_by_path(trainer)
    assert sorted(paths) == [
        "global_step",
        "loss",
        "model/b1",
        "model/b2",
        "model/w1",
        "model/w2",
    ]
    assert trainer.model.w1.name == "mlp/w1:0"
    assert {v.name for v in trainer.trainable_variables} == {
        "mlp/b1:0",
        "mlp/b2:0",
        "mlp/w1:0",
        "mlp/w2:0",
    }
    assert len(trainer.non_trainable_variables) == 2


def test_tf_module_and_keras_layer_held_as_attributes_are_walked() -> None:
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend")

    class Inner(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [tf.Variable(1.0), tf.Variable(2.0, trainable=False)]

    holder = looproto.Module(name="holder")
    holder.inner = Inner()  # type: ignore[attr-defined]
    dense = keras.layers.Dense(3, name="dense_for_test")
    dense.build((None, 2))
    holder.dense = dense  # type: ignore[attr-defined]
    paths = variables_by_path(holder)
    assert sorted(paths) == ["dense/bias", "dense/kernel", "inner/layers/0", "inner/layers/1"]
    assert [v.trainable for v in holder.trainable_variables] == [True, True, True]
    assert paths["dense/kernel"] is dense.kernel


def test_assign_checks_shape_and_dtype() -> None:
    variable = tf.Variable(np.zeros((2, 3), np.float32))
    BACKEND.assign(variable, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(variable.numpy(), np.ones((2, 3)))
    with pytest.raises(ShapeError, match=r"shape \(3, 2\)"):
        BACKEND.assign(variable, np.ones((3, 2), np.float32))
    with pytest.raises(ShapeError, match="float64"):
        BACKEND.assign(variable, np.ones((2, 3), np.float64))


# -- the compiled loop -----------------------------------------------------------------------


def test_matches_hand_written_loop_and_traces_once_for_any_num_steps() -> None:
    trainer = Trainer(dataset())
    for n in (3, 7, 5):
        trainer.train(n)
    expected = reference(15)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)
    assert int(trainer.global_step.numpy()) == 15
    loop = trainer._train_loop_fn
    assert isinstance(loop, tf_backend.TensorflowLoop)
    # num_steps enters the tf.function as a tensor: one trace for all three calls.
    assert loop.trace_count == 1


@pytest.mark.parametrize(
    "options",
    [
        {"use_compiled_loop": False},
        {"use_compiled_loop": False, "use_compiled_step": False},
        {"backend_options": {"jit_compile": True}},
    ],
    ids=["tf-function-step", "eager", "xla"],
)
def test_other_loop_kinds_match(options: dict[str, Any]) -> None:
    class T(Trainer):
        def __init__(self) -> None:
            super().__init__(dataset())
            self._train_options = looproto.StandardTrainerOptions(**options)

    trainer = T()
    trainer.train(4)
    trainer.train(6)
    expected = reference(10)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)


def test_new_batch_shape_retraces_once_and_finite_data_ends_cleanly() -> None:
    # 96 examples in batches of 36: two full batches and a short one of 24.
    trainer = Trainer(dataset(batch=36, repeat=False))
    trainer.train(10)
    assert int(trainer.global_step.numpy()) == 3
    loop = trainer._train_loop_fn
    assert loop.trace_count == 1  # reduce_retracing is off, but shapes are (None, 4)
    expected = reference(3, batch=36)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)
    # The exhausted iterator: no more steps, no error, no phantom step counted.
    trainer.train(5)
    assert int(trainer.global_step.numpy()) == 3


def test_train_until_data_ends_through_the_controller(tmp_path: Any) -> None:
    trainer = Trainer(dataset(batch=8, repeat=False))
    controller = looproto.Controller(
        trainer=trainer,
        global_step=trainer.global_step,
        steps_per_loop=5,
        summary_dir=str(tmp_path / "summaries"),
        checkpoint_manager=looproto.CheckpointManager(
            str(tmp_path / "ckpt"), trainer, step_counter=trainer.global_step
        ),
    )
    controller.train(steps=-1)
    controller.close()
    assert int(trainer.global_step.numpy()) == 12  # 96 / 8
    events = testing.read_events(tmp_path / "summaries")["."]
    assert [step for step, _ in events["loss"]] == [5, 10, 12]
    assert all(np.isfinite(value) for _, value in events["loss"])
    assert os.listdir(tmp_path / "ckpt") == ["12"]


def test_python_iterator_runs_one_tf_function_per_step(caplog: Any) -> None:
    x, y = make_data()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    trainer = Trainer(_Batches(batches))
    trainer.train(4)
    assert "compiles the whole loop only for `tf.data` iterators" in caplog.text
    expected = reference(4)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)


def test_finite_python_iterator_ends_cleanly_one_call_per_step() -> None:
    x, y = make_data()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    trainer = Trainer(_Batches(batches))
    trainer.train(20)  # 12 batches: the loop stops after them, no error
    assert int(trainer.global_step.numpy()) == 12
    expected = reference(12)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)


class _Batches:
    """A plain Python iterable of `(x, y)` batches (not `tf.data`)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_evaluator_reduces_into_python_state() -> None:
    class Evaluator(looproto.StandardEvaluator):
        def __init__(self) -> None:
            super().__init__(dataset(batch=32, repeat=False))
            self.model = MLP()

        def eval_begin(self) -> list[float]:
            return []

        def eval_step(self, iterator: Any) -> Any:
            x, y = next(iterator)
            return tf.reduce_mean((forward(self.model.params(), x) - y) ** 2)

        def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
            return [*state, float(step_outputs)]

        def eval_end(self, *args: Any) -> dict[str, Any]:
            return {"losses": np.array(args[0])}

    out = Evaluator().evaluate(-1)
    x, y = make_data()
    params = init_params()
    expected = [
        float(np.mean((np.tanh(x[i : i + 32] @ params["w1"]) @ params["w2"] - y[i : i + 32]) ** 2))
        for i in range(0, 96, 32)
    ]
    assert out is not None
    np.testing.assert_allclose(out["losses"], expected, rtol=1e-5)


# -- bad input -----------------------------------------------------------------------------


def test_python_side_effect_in_step_warns_it_runs_once_per_trace() -> None:
    class Counting(Trainer):
        calls = 0

        def __init__(self) -> None:
            super().__init__(dataset())
            self.calls = 0

        def train_step(self, iterator: Any) -> None:
            super().train_step(iterator)
            self.calls += 1

    trainer = Counting()
    with pytest.warns(tf_backend.TraceSideEffectWarning, match=r"changed `self.calls`"):
        trainer.train(5)
    assert trainer.calls == 1  # what the warning is about: once per trace, not per step


def test_numpy_variable_outside_the_module_assigned_in_a_compiled_step_is_an_error() -> None:
    outside = looproto.Variable(np.float32(0), trainable=False, name="outside")

    class Bad(Trainer):
        def train_step(self, iterator: Any) -> None:
            x, _ = next(iterator)
            outside.assign(tf.reduce_sum(x))  # Not reachable from the trainer: not lifted.

    with pytest.raises(ProtocolError, match=r"cannot be updated from inside `tf\.function`"):
        Bad(dataset()).train(2)
    assert float(outside) == 0.0


def test_assigning_a_lifted_variable_keeps_variable_rules() -> None:
    class Bad(Trainer):
        def __init__(self, value: Any) -> None:
            super().__init__(dataset())
            self.total = looproto.Variable(np.zeros(2, np.float32), trainable=False, name="t")
            self.value = value

        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.total.assign(self.value())

    for value, match in (
        (lambda: tf.zeros(3), r"shape \(3,\) to variable 't:0' of shape \(2,\)"),
        (lambda: tf.zeros(2, tf.float64), "dtype float64 to variable 't:0' of dtype float32"),
        (lambda: np.zeros(2, np.float64), "dtype float64"),
        (lambda: 1.5, r"shape \(\) to variable 't:0' of shape \(2,\)"),
    ):
        trainer = Bad(value)
        with pytest.raises(ShapeError, match=match):
            trainer.train(1)
        np.testing.assert_array_equal(trainer.total.numpy(), [0.0, 0.0])
        assert isinstance(trainer.total.value, np.ndarray)  # unbound again after the error


# -- NumPy Variables, Python data, gradients -------------------------------------------------


class NumpyTrainer(looproto.StandardTrainer):
    """The MLP of `Trainer` held in NumPy `looproto.Variable`s, fed by an `ArrayDataset`.

    The backend lifts the Variables into `tf.Variable`s while a loop runs; gradients come
    from `tf_backend.value_and_grad`, keyed by path.
    """

    def __init__(self, data: str = "auto", compiled: bool = True, batch: int = 8) -> None:
        from looproto.data import ArrayDataset

        x, y = make_data()
        options = looproto.StandardTrainerOptions(
            backend="tensorflow",
            backend_options={"data": data},
            use_compiled_step=compiled,
            use_compiled_loop=compiled,
        )
        super().__init__(ArrayDataset((x, y), batch, epochs=None), options=options)
        self.global_step = looproto.create_global_step()
        with self.name_scope:
            self.params = {k: looproto.Variable(v, name=k) for k, v in init_params().items()}
            self.loss_sum = looproto.Variable(np.float32(0), trainable=False, name="loss_sum")

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)

        def loss_fn() -> Any:
            params = {k: v.value for k, v in self.params.items()}
            return tf.reduce_mean((forward(params, x) - y) ** 2)

        loss, grads = tf_backend.value_and_grad(loss_fn, self.params)
        for key, variable in self.params.items():
            variable.assign(variable.value - LR * grads[key])
        self.loss_sum.assign_add(loss)
        self.global_step.assign_add(1)


@pytest.mark.parametrize(
    ("data", "compiled"),
    [("auto", True), ("step", True), ("auto", False)],
    ids=["stacked-while-loop", "tf-function-per-step", "eager"],
)
def test_numpy_variables_are_lifted_and_match_the_hand_written_loop(
    data: str, compiled: bool
) -> None:
    trainer = NumpyTrainer(data, compiled)
    for n in (3, 7, 5):
        trainer.train(n)
    expected = reference(15)
    for key, variable in trainer.params.items():
        # Back on the host between loops, in their own dtype: what checkpoints read.
        assert isinstance(variable.value, np.ndarray)
        assert variable.dtype == np.float32
        np.testing.assert_allclose(variable.value, expected[key], rtol=1e-5, atol=1e-6)
    assert isinstance(trainer.global_step.value, np.ndarray)
    assert trainer.global_step.dtype == np.int64
    assert int(trainer.global_step) == 15
    assert float(trainer.loss_sum) > 0
    loop = trainer._train_loop_fn
    assert isinstance(loop, tf_backend.TensorflowLoop)
    if compiled:
        assert loop.trace_count == 1  # the stacked call leaves the step count unknown


def test_stacked_loop_runs_all_steps_in_one_call_and_retraces_once_per_batch_shape(
    caplog: Any,
) -> None:
    from looproto.data import ArrayDataset

    trainer = NumpyTrainer()
    x, y = make_data()
    # 96 examples in batches of 36, not dropping the remainder: 36, 36, 24, 36, 36, 24, ...
    trainer.train_dataset = ArrayDataset((x, y), 36, epochs=2, drop_remainder=False)
    trainer.train(4)
    loop = trainer._train_loop_fn
    assert loop.trace_count == 2  # (36, 4) and (24, 4)
    assert "compiles the whole loop only for `tf.data`" not in caplog.text
    trainer.train(-1)  # until the data ends: the last two batches
    assert int(trainer.global_step) == 6
    assert loop.trace_count == 2
    # The same 6 steps by hand: two epochs of batches 36, 36, 24, in order.
    variables = {key: tf.Variable(value) for key, value in init_params().items()}
    for start in (0, 36, 72) * 2:
        xb, yb = x[start : start + 36], y[start : start + 36]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((forward(variables, xb) - yb) ** 2)
        for variable, g in zip(variables.values(), tape.gradient(loss, list(variables.values()))):
            variable.assign_sub(LR * g)
    for key, variable in trainer.params.items():
        np.testing.assert_allclose(variable.value, variables[key].numpy(), rtol=1e-5, atol=1e-6)


def test_value_and_grad_matches_gradient_tape_with_aux_and_zeros_for_unused() -> None:
    module = looproto.Module(name="m")
    module.w = tf.Variable([1.0, 2.0])
    module.unused = tf.Variable(3.0)
    module.frozen = tf.Variable(4.0, trainable=False)
    module.steps = tf.Variable(0, dtype=tf.int64)  # trainable, but an integer: no gradient

    def fn() -> Any:
        return tf.reduce_sum(module.w**2) * module.frozen, {"norm": tf.norm(module.w)}

    (loss, aux), grads = tf_backend.value_and_grad(fn, module, has_aux=True)
    assert float(loss) == 20.0
    np.testing.assert_allclose(aux["norm"].numpy(), np.sqrt(5.0), rtol=1e-6)
    assert sorted(grads) == ["unused", "w"]
    np.testing.assert_allclose(grads["w"].numpy(), [8.0, 16.0])
    assert float(grads["unused"]) == 0.0
    only, _ = BACKEND.grad(fn, module, has_aux=True)
    np.testing.assert_allclose(only["w"].numpy(), [8.0, 16.0])

    @tf.function
    def compiled() -> Any:
        return tf_backend.grad(lambda: tf.reduce_sum(module.w**3), module)["w"]

    np.testing.assert_allclose(compiled().numpy(), [3.0, 12.0])


def test_value_and_grad_bad_input() -> None:
    module = looproto.Module(name="m")
    module.w = tf.Variable([1.0, 2.0])
    with pytest.raises(ProtocolError, match="scalar loss"):
        tf_backend.value_and_grad(lambda: module.w * 2, module)
    with pytest.raises(ProtocolError, match=r"must return `\(loss, aux\)`"):
        tf_backend.value_and_grad(lambda: tf.reduce_sum(module.w), module, has_aux=True)
    module.host = looproto.Variable(np.float32(1), name="host")
    with pytest.raises(ProtocolError, match=r"'host'.*outside them, hold `tf\.Variable`s"):
        tf_backend.value_and_grad(lambda: tf.reduce_sum(module.w), module)


def test_array_namespace_adds_the_standard_names_tf_numpy_lacks() -> None:
    xp = BACKEND.array_namespace()
    assert xp is tf_backend.array_namespace()
    x = tf.reshape(tf.range(6, dtype=tf.float32), (1, 2, 3))
    assert xp.astype(x, np.int32).dtype == tf.int32
    assert xp.astype(x, tf.float64).dtype == tf.float64
    np.testing.assert_array_equal(
        xp.permute_dims(x, (2, 0, 1)).numpy(), np.transpose(x.numpy(), (2, 0, 1))
    )
    np.testing.assert_array_equal(xp.matrix_transpose(x).numpy(), np.swapaxes(x.numpy(), -1, -2))
    np.testing.assert_array_equal(
        xp.concat([x, x], axis=1).numpy(), np.concatenate([x.numpy()] * 2, axis=1)
    )
    np.testing.assert_array_equal(
        xp.concat([x, x], axis=None).numpy(), np.concatenate([x.numpy().ravel()] * 2)
    )
    np.testing.assert_allclose(xp.pow(x, 2.0).numpy(), x.numpy() ** 2)
    # Everything else is tf.experimental.numpy's.
    np.testing.assert_allclose(xp.mean(xp.tanh(x)).numpy(), np.mean(np.tanh(x.numpy())))
    assert xp.float32 is np.float32


def test_changed_element_spec_is_a_config_error() -> None:
    trainer = Trainer(dataset())
    trainer.train(2)
    x, y = make_data()
    trainer.train_dataset = tf.data.Dataset.from_tensor_slices(
        (x.astype(np.float64), y.astype(np.float64))
    ).batch(8)
    with pytest.raises(ConfigError, match="element spec changed"):
        trainer.train(2)


def test_two_next_calls_in_one_compiled_step_raise() -> None:
    class Greedy(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            next(iterator)

    with pytest.raises(ProtocolError, match=r"called `next\(iterator\)` twice"):
        Greedy(dataset()).train(2)


def test_backend_options_are_checked() -> None:
    for bad, match in (
        ({"nope": 1}, "Unknown TensorFlow"),
        ({"strategy": "mirrored"}, "tf.distribute.Strategy"),
        ({"output_reduction": "max"}, "output_reduction"),
        ({"jit_compile": "yes"}, "jit_compile"),
        ({"data": "device"}, r"`data` must be one of \['auto', 'stack', 'step'\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            Trainer(dataset(), **bad).train(1)


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoints_cross_tensorflow_and_numpy(tmp_path: Any) -> None:
    class NumpyModel(looproto.Module):
        def __init__(self, scale: float) -> None:
            super().__init__(name="mlp")
            with self.name_scope:
                for key, value in init_params().items():
                    setattr(self, key, looproto.Variable(value * scale, name=key))

    class TfModel(looproto.Module):
        def __init__(self, scale: float) -> None:
            super().__init__(name="mlp")
            with self.name_scope:
                for key, value in init_params().items():
                    setattr(self, key, tf.Variable(value * scale, name=key))

    for source_cls, target_cls in ((TfModel, NumpyModel), (NumpyModel, TfModel)):
        source, target = source_cls(2.0), target_cls(0.0)
        directory = str(tmp_path / source_cls.__name__)
        with looproto.CheckpointManager(directory, source) as manager:
            manager.save(checkpoint_number=1)
        with looproto.CheckpointManager(directory, target) as manager:
            manager.restore(manager.latest_checkpoint)
        for path, variable in variables_by_path(target).items():
            np.testing.assert_array_equal(
                variable_to_numpy(variable), init_params()[path] * 2.0, err_msg=path
            )
        if target_cls is TfModel:
            assert isinstance(target.w1, tf.Variable)


def test_controller_restores_tf_variables_on_start(tmp_path: Any) -> None:
    def controller(trainer: Trainer) -> looproto.Controller:
        return looproto.Controller(
            trainer=trainer,
            global_step=trainer.global_step,
            steps_per_loop=4,
            checkpoint_manager=looproto.CheckpointManager(
                str(tmp_path), trainer, step_counter=trainer.global_step
            ),
        )

    first = Trainer(dataset())
    c = controller(first)
    c.train(8)
    c.close()
    resumed = Trainer(dataset())
    c = controller(resumed)  # restores step 8 during construction
    assert int(resumed.global_step.numpy()) == 8
    for key, value in model_params(first).items():
        np.testing.assert_array_equal(model_params(resumed)[key], value)
    c.train(12)
    c.close()
    assert int(resumed.global_step.numpy()) == 12
    assert sorted(os.listdir(tmp_path)) == ["12", "8"]


def test_resume_with_shuffled_tf_data_is_bit_identical(tmp_path: Any) -> None:
    def shuffled() -> Any:
        return tf.data.Dataset.from_tensor_slices(make_data()).shuffle(64, seed=3).batch(8).repeat()

    def run(steps: int, directory: str) -> Trainer:
        trainer = Trainer(shuffled())
        controller = looproto.Controller(
            trainer=trainer,
            global_step=trainer.global_step,
            steps_per_loop=3,
            checkpoint_manager=looproto.CheckpointManager(
                directory, trainer, step_counter=trainer.global_step
            ),
        )
        controller.train(steps)
        controller.close()
        return trainer

    run(9, str(tmp_path / "resumed"))  # stops mid-epoch, shuffle buffer half used
    resumed = run(21, str(tmp_path / "resumed"))
    straight = run(21, str(tmp_path / "straight"))
    for key, value in model_params(straight).items():
        np.testing.assert_array_equal(model_params(resumed)[key], value, err_msg=key)
    meta = os.path.join(tmp_path, "resumed", "21", "meta", "metadata")
    with open(meta) as f:
        assert "_train_iter" in f.read()


# -- tf.distribute -------------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import looproto
    from tests.backends.test_tensorflow import Trainer, dataset, model_params, reference

    expected = reference(10, batch=8)
    results = {}
    for name in ("mirrored", "one_device", "from_function"):
        if name == "one_device":
            strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        else:
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        if name == "from_function":
            def fn(ctx):
                batch = ctx.get_per_replica_batch_size(8)
                return dataset(batch=8).rebatch(batch)
            data = strategy.distribute_datasets_from_function(fn)
        else:
            data = strategy.experimental_distribute_dataset(dataset(batch=8))
        with strategy.scope():
            trainer = Trainer(data, strategy=strategy)
        trainer.train(4)
        trainer.train(6)
        assert int(looproto.module.variable_to_numpy(trainer.global_step)) == 10, name
        for key, value in model_params(trainer).items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=name)
        if name == "mirrored":
            local = strategy.experimental_local_results(
                trainer.model.w1)
            np.testing.assert_array_equal(local[0].numpy(), local[1].numpy())
            # The step body is traced once per replica, once: a new num_steps never retraces.
            assert trainer._train_loop_fn.trace_count == 2, trainer._train_loop_fn.trace_count
    # A plain dataset under a 2-replica strategy is refused with a clear error.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        trainer = Trainer(dataset(batch=8), strategy=strategy)
    try:
        trainer.train(2)
    except looproto.ConfigError as err:
        assert "must be distributed" in str(err)
    else:
        raise AssertionError("no error for an undistributed dataset")
    # NumPy Variables are not lifted under 2 replicas: a step that updates one is refused.
    class Counting(Trainer):
        def train_step(self, iterator):
            super().train_step(iterator)
            self.count.assign(tf.constant(1, tf.int64))

    data = strategy.experimental_distribute_dataset(dataset(batch=8))
    with strategy.scope():
        trainer = Counting(data, strategy=strategy)
    trainer.count = looproto.create_global_step()
    try:
        trainer.train(2)
    except looproto.ProtocolError as err:
        assert "multi-replica strategy" in str(err) and "global_step:0" in str(err), err
    else:
        raise AssertionError("no error for a NumPy Variable updated under 2 replicas")
    assert isinstance(trainer.count.value, np.ndarray) and int(trainer.count) == 0
    print("MIRRORED_OK")
    """
)


def test_mirrored_and_one_device_strategies_match_one_device() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "src")])
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "MIRRORED_OK" in result.stdout, result.stdout + result.stderr[-4000:]


def test_trace_side_effect_warning_class_is_a_user_warning() -> None:
    assert issubclass(tf_backend.TraceSideEffectWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(dataset()).train(1)  # a clean step warns about nothing


# ---------------------------------------------------------------------------
# A step that changes its batch; TensorFlow's own checkpoints; Variables as tensors


class _LabelPopper(looproto.StandardTrainer):
    """Orbit's `single_task` step: the label is taken out of the batch dict."""

    def __init__(self, compile_loop: bool) -> None:
        data = {"features": np.ones((8, 2), np.float32), "label": np.arange(8, dtype=np.float32)}
        super().__init__(
            train_dataset=tf.data.Dataset.from_tensor_slices(data).batch(2),
            options=looproto.StandardTrainerOptions(use_compiled_loop=compile_loop),
        )
        self.total = tf.Variable(0.0)

    def train_step(self, iterator: Any) -> None:
        inputs = next(iterator)
        label = inputs.pop("label")
        self.total.assign_add(tf.reduce_sum(label) + tf.reduce_sum(inputs["features"]) * 0)


@pytest.mark.parametrize("compile_loop", [True, False], ids=["while_loop", "per_step"])
def test_a_compiled_step_may_pop_from_its_tf_data_batch(compile_loop: bool) -> None:
    trainer = _LabelPopper(compile_loop)
    trainer.train(3)
    trainer.train(-1)  # and to the end of the data
    assert float(trainer.total.numpy()) == sum(range(8))


def _keras_parts() -> tuple[Any, Any]:
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.Input(shape=(3,)), tf_keras.layers.Dense(2)])
    optimizer = tf_keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.ones((1, 3))))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.variables), model.variables))
    return model, optimizer


def test_a_tf_train_checkpoint_root_saves_what_it_tracks(tmp_path: Any) -> None:
    model, optimizer = _keras_parts()
    step = tf.Variable(1, dtype=tf.int64)
    root = tf.train.Checkpoint(model=model, step=step)
    paths = variables_by_path(root)
    assert paths and all(p.split("/")[0] in ("model", "step") for p in paths)
    assert any(v is step for v in paths.values())
    with looproto.CheckpointManager(tmp_path, root, step_counter=step) as manager:
        saved = [w.numpy() for w in model.weights]
        assert manager.save() == str(tmp_path / "1")  # numbered by `step`
        for w in model.weights:
            w.assign(tf.zeros_like(w))
        step.assign(0)
        manager.restore_or_initialize()
    assert int(step.numpy()) == 1
    for w, expected in zip(model.weights, saved, strict=True):
        np.testing.assert_array_equal(w.numpy(), expected)
    # A tf_keras optimizer it tracks is state looproto cannot capture whole: refused.
    with_optimizer = tf.train.Checkpoint(model=model, optimizer=optimizer)
    with looproto.CheckpointManager(tmp_path / "opt", with_optimizer) as manager:
        with pytest.raises(looproto.CheckpointError, match=r"'optimizer'.*tf_keras"):
            manager.save(checkpoint_number=1)


def test_tf_checkpoint_manager_refuses_a_checkpoint_that_tracks_nothing(tmp_path: Any) -> None:
    manager = tf_backend.TfCheckpointManager(
        tf.train.CheckpointManager(tf.train.Checkpoint(), str(tmp_path), max_to_keep=None)
    )
    with pytest.raises(looproto.CheckpointError, match=r"tracks no variable"):
        manager.save(checkpoint_number=1)
    assert not tf.io.gfile.glob(str(tmp_path / "ckpt*"))
    with pytest.raises(ConfigError, match=r"tf\.train\.CheckpointManager"):
        tf_backend.TfCheckpointManager(manager)


def test_tf_checkpoint_manager_saves_restores_and_passes_the_rest_through(tmp_path: Any) -> None:
    model, optimizer = _keras_parts()
    tf_manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer),
        str(tmp_path),
        max_to_keep=2,
        step_counter=optimizer.iterations,
        checkpoint_interval=1,
    )
    manager = tf_backend.TfCheckpointManager(tf_manager, enable_async=True)
    assert isinstance(manager, looproto.controller.CheckpointManagerLike)
    assert manager.step_counter is optimizer.iterations
    assert (manager.directory, manager.checkpoint_interval) == (str(tmp_path), 1)
    first = manager.save(checkpoint_number=1)
    manager.sync()
    assert manager.latest_checkpoint == first == str(tmp_path / "ckpt-1")
    assert manager.checkpoints == tf_manager.checkpoints == [first]
    assert manager.checkpoint is tf_manager.checkpoint
    kernel = model.weights[0].numpy()
    model.weights[0].assign(tf.zeros_like(model.weights[0]))
    assert manager.restore(first) == first
    np.testing.assert_array_equal(model.weights[0].numpy(), kernel)


def test_tensorflow_reads_a_looproto_variable_by_its_current_value() -> None:
    # Converted to a tensor, a Variable is its value at that moment (its bound twin in
    # a loop), never a copy frozen into the graph traced first.
    v = looproto.Variable(np.float32(1.0))
    read = tf.function(lambda: tf.identity(v) * 2)
    assert float(read()) == 2.0
    v.assign(np.float32(5.0))
    assert float(tf.add(v, 1)) == 6.0
