"""`looproto.orbit.Controller`: Orbit's behaviours on looproto's outer loop.

Orbit's own `controller_test.py` runs in `test_orbit_suite.py`; these check what it
does not: in-step summaries under `summary_interval`, Orbit's checkpoint rules with a
`tf.train.CheckpointManager`, the restored-step check, `num_steps` as a tensor, a
foreign summary manager, and a ported trainer on other backends.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto import orbit  # noqa: E402
from looproto.testing import read_events  # noqa: E402


class Counter(orbit.StandardTrainer):
    """Sums a `tf.data` range; writes `tf.summary` inside its step."""

    __test__ = False

    def __init__(self, global_step: Any, tpu_summaries: bool = False) -> None:
        self.global_step = global_step
        self.total = tf.Variable(0.0)
        dataset = tf.data.Dataset.range(1000).map(lambda x: tf.cast(x, tf.float32))
        options = orbit.StandardTrainerOptions(use_tpu_summary_optimization=tpu_summaries)
        super().__init__(dataset, options=options)

    def train_step(self, iterator: Any) -> None:
        x = next(iterator)
        tf.summary.scalar("in_step", x)  # at the default step: the global step
        self.total.assign_add(x)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return {"total": self.total}


def _steps(logdir: Any) -> dict[str, list[int]]:
    return {tag: [step for step, _ in values] for tag, values in read_events(logdir)["."].items()}


@pytest.mark.parametrize("tpu_summaries", [False, True], ids=["one_loop", "tpu_optimization"])
@pytest.mark.parametrize(
    "make_step",
    [orbit.utils.create_global_step, looproto.create_global_step],
    ids=["tf_variable", "looproto_variable"],
)
def test_in_step_summaries_are_recorded_at_multiples_of_summary_interval(
    tmp_path: Any, make_step: Any, tpu_summaries: bool
) -> None:
    trainer = Counter(make_step(), tpu_summaries)
    controller = orbit.Controller(
        trainer=trainer,
        global_step=trainer.global_step,
        steps_per_loop=2,
        summary_dir=tmp_path,
        summary_interval=4,
    )
    controller.train(12)
    steps = _steps(tmp_path)
    assert steps["in_step"] == [0, 4, 8]  # recorded where global_step % 4 == 0
    assert steps["total"] == steps["steps_per_second"] == [2, 4, 6, 8, 10, 12]  # every loop
    assert len(os.listdir(tmp_path)) == 1  # one event file, as Orbit writes


def test_without_summary_interval_no_in_step_summary_is_recorded(tmp_path: Any) -> None:
    trainer = Counter(orbit.utils.create_global_step())
    controller = orbit.Controller(
        trainer=trainer, global_step=trainer.global_step, steps_per_loop=3, summary_dir=tmp_path
    )
    controller.train(6)
    assert set(_steps(tmp_path)) == {"total", "steps_per_second"}


# ------------------------------------------------------------------ checkpoints


class KerasTrainer(orbit.StandardTrainer):
    """A tf_keras model and optimizer; the global step is the optimizer's `iterations`."""

    __test__ = False

    def __init__(self) -> None:
        tf_keras = pytest.importorskip("tf_keras")
        self.model = tf_keras.Sequential([tf_keras.Input(shape=(3,)), tf_keras.layers.Dense(1)])
        self.optimizer = tf_keras.optimizers.SGD(0.1)
        x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
        dataset = tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).batch(8)
        super().__init__(dataset.repeat())

    def train_step(self, iterator: Any) -> None:
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((self.model(x) - y) ** 2)
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


def _tf_manager(directory: Any, trainer: KerasTrainer, **kwargs: Any) -> Any:
    kwargs.setdefault("checkpoint", tf.train.Checkpoint(model=trainer.model))
    return tf.train.CheckpointManager(
        kwargs.pop("checkpoint"),
        str(directory),
        max_to_keep=None,
        step_counter=trainer.optimizer.iterations,
        **kwargs,
    )


def _controller(trainer: KerasTrainer, manager: Any, **kwargs: Any) -> Any:
    return orbit.Controller(
        trainer=trainer,
        global_step=trainer.optimizer.iterations,
        steps_per_loop=5,
        checkpoint_manager=manager,
        **kwargs,
    )


def test_without_checkpoint_interval_nothing_is_saved_as_in_orbit(tmp_path: Any) -> None:
    trainer = KerasTrainer()
    controller = _controller(trainer, _tf_manager(tmp_path, trainer))
    controller.train(10)
    controller.save_checkpoint()
    assert int(trainer.optimizer.iterations.numpy()) == 10
    assert not tf.io.gfile.glob(str(tmp_path / "ckpt*"))


@pytest.mark.parametrize("enable_async", [False, True], ids=["sync", "async"])
def test_tf_checkpoint_manager_saves_by_interval_and_resumes(
    tmp_path: Any, enable_async: bool
) -> None:
    trainer = KerasTrainer()
    checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer)
    manager = _tf_manager(tmp_path, trainer, checkpoint=checkpoint, checkpoint_interval=10)
    _controller(trainer, manager, enable_async_checkpointing=enable_async).train(20)
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-5", "ckpt-15", "ckpt-20"]

    again = KerasTrainer()
    checkpoint = tf.train.Checkpoint(model=again.model, optimizer=again.optimizer)
    manager = _tf_manager(tmp_path, again, checkpoint=checkpoint, checkpoint_interval=10)
    controller = _controller(again, manager)
    assert int(again.optimizer.iterations.numpy()) == 20
    for resumed, saved in zip(again.model.weights, trainer.model.weights, strict=True):
        np.testing.assert_array_equal(resumed.numpy(), saved.numpy())
    controller.train(25)
    assert os.path.basename(manager.checkpoints[-1]) == "ckpt-25"


def test_a_global_step_left_out_of_the_checkpoint_is_refused_on_restart(tmp_path: Any) -> None:
    # The optimizer (whose `iterations` is the global step) is not in the checkpoint: a
    # restart would train on from step 0 with the weights of step 10.
    trainer = KerasTrainer()
    _controller(trainer, _tf_manager(tmp_path, trainer, checkpoint_interval=5)).train(10)

    restarted = KerasTrainer()
    with pytest.raises(
        looproto.CheckpointError,
        match=r"global step is not part of what was checkpointed.*ckpt-10.*reads 0",
    ):
        _controller(restarted, _tf_manager(tmp_path, restarted, checkpoint_interval=5))


def test_enable_async_checkpointing_with_a_looproto_manager_says_where_it_goes(
    tmp_path: Any,
) -> None:
    step = looproto.create_global_step()
    holder = looproto.Module(name="holder")
    holder.step = step
    with pytest.raises(looproto.ConfigError, match="enable_async=True"):
        orbit.Controller(
            trainer=Counter(step),
            global_step=step,
            steps_per_loop=1,
            checkpoint_manager=looproto.CheckpointManager(tmp_path, holder),
            enable_async_checkpointing=True,
        )


def test_evaluate_continuously_reads_tensorflow_checkpoints(tmp_path: Any) -> None:
    trainer = KerasTrainer()
    checkpoint = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer)
    manager = _tf_manager(tmp_path, trainer, checkpoint=checkpoint, checkpoint_interval=5)
    _controller(trainer, manager).train(10)

    class Probe(orbit.AbstractEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def evaluate(self, num_steps: Any) -> Any:
            self.seen.append(int(trainer.optimizer.iterations.numpy()))
            return {"step": self.seen[-1]}

    probe = Probe()
    watcher = orbit.Controller(
        evaluator=probe, global_step=trainer.optimizer.iterations, checkpoint_manager=manager
    )
    output = watcher.evaluate_continuously(timeout=0.5)
    assert probe.seen[-1] == 10 and output["step"] == 10


# ------------------------------------------------------------ runners and managers


class Recorder(orbit.AbstractTrainer, orbit.AbstractEvaluator):
    """Records the `num_steps` it is given."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.step = orbit.utils.create_global_step()
        self.received: list[Any] = []

    def train(self, num_steps: Any) -> Any:
        self.received.append(num_steps)
        self.step.assign_add(tf.cast(num_steps, tf.int64))
        return {"seen": num_steps}

    def evaluate(self, num_steps: Any) -> Any:
        self.received.append(num_steps)
        return None


def test_num_steps_is_a_tensor_for_orbit_runners_and_an_int_for_core_ones() -> None:
    recorder = Recorder()
    controller = orbit.Controller(
        trainer=recorder, evaluator=recorder, global_step=recorder.step, steps_per_loop=3
    )
    controller.train(tf.constant(6))
    controller.evaluate(2)
    assert all(isinstance(n, tf.Tensor) and n.dtype == tf.int32 for n in recorder.received)
    assert [int(n) for n in recorder.received] == [3, 3, 2]

    class Core(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(train_dataset=None)
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            self.global_step.assign_add(1)

    core = Core()
    orbit.Controller(trainer=core, global_step=core.global_step, steps_per_loop=2).train(4)
    assert core.global_step == 4


def test_a_summary_manager_with_orbit_s_interface_only_is_used(tmp_path: Any) -> None:
    class Minimal(orbit.utils.SummaryManagerInterface):
        def __init__(self) -> None:
            self.written: list[Any] = []
            self.writer = tf.summary.create_file_writer(str(tmp_path))

        def flush(self) -> None:
            self.writer.flush()

        def summary_writer(self, relative_path: str = "") -> Any:
            return self.writer

        def write_summaries(self, summary_dict: Any) -> None:
            self.written.append(dict(summary_dict))

    recorder, minimal = Recorder(), Minimal()
    controller = orbit.Controller(
        trainer=recorder, global_step=recorder.step, steps_per_loop=2, summary_manager=minimal
    )
    controller.train(4)
    assert [entry["seen"] for entry in minimal.written] == [2, 2]
    assert controller.summary_manager.manager is minimal


class PortedTrainer(orbit.StandardTrainer):
    """Ported Orbit code whose step uses only array operators: it runs on any backend."""

    __test__ = False

    def __init__(self, backend: str) -> None:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 2)).astype(np.float32)
        data = {"x": x, "y": x @ np.array([[2.0], [-1.0]], np.float32)}
        super().__init__(
            looproto.data.ArrayDataset(data, batch_size=32, epochs=None),
            options=orbit.StandardTrainerOptions(backend=backend),
        )
        self.global_step = looproto.create_global_step()
        self.w = looproto.Variable(np.zeros((2, 1), np.float32))

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        err = batch["x"] @ self.w.value - batch["y"]
        self.w.assign(self.w.value - 0.1 * (batch["x"].T @ err) / 32)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return {"w0": self.w.numpy()[0, 0]}


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_ported_code_runs_on_another_backend_and_resumes(tmp_path: Any, backend: str) -> None:
    if backend != "numpy":
        pytest.importorskip(backend)

    def run(steps: int) -> PortedTrainer:
        trainer = PortedTrainer(backend)
        controller = orbit.Controller(
            trainer=trainer,
            global_step=trainer.global_step,
            steps_per_loop=50,
            checkpoint_manager=looproto.CheckpointManager(
                tmp_path / "ckpt",
                trainer,
                step_counter=trainer.global_step,
                checkpoint_interval=50,
            ),
            summary_dir=tmp_path / "summaries",
        )
        controller.train(steps)
        return trainer

    first = run(100)
    np.testing.assert_allclose(first.w.numpy().ravel(), [2.0, -1.0], atol=0.05)
    second = run(150)
    assert second.global_step == 150
    assert sorted(int(n) for n in os.listdir(tmp_path / "ckpt")) == [50, 100, 150]
    assert [s for s, _ in read_events(tmp_path / "summaries")["."]["w0"]] == [50, 100, 150]


def test_a_tf_keras_optimizer_in_a_looproto_checkpoint_is_refused_at_the_first_save(
    tmp_path: Any,
) -> None:
    # A tf_keras optimizer keys its slots by variable ids: looproto cannot checkpoint it,
    # so a looproto manager refuses it loudly at the first save (a resumed run would
    # otherwise restart its slots and, as the global step, its `iterations` from 0). With
    # TensorFlow's own manager the same trainer checkpoints and resumes (see above).
    trainer = KerasTrainer()
    trainer.global_step = trainer.optimizer.iterations
    manager = looproto.CheckpointManager(
        tmp_path, trainer, step_counter=trainer.optimizer.iterations, checkpoint_interval=5
    )
    with pytest.raises(looproto.CheckpointError, match=r"Cannot save 'optimizer'.*tf_keras"):
        _controller(trainer, manager).train(10)
    assert looproto.checkpoint.latest_step(tmp_path) is None


def test_a_core_summary_manager_writes_the_loop_outputs(tmp_path: Any) -> None:
    recorder = Recorder()
    summaries = looproto.SummaryManager(tmp_path, global_step=recorder.step)
    controller = orbit.Controller(
        trainer=recorder, global_step=recorder.step, steps_per_loop=2, summary_manager=summaries
    )
    controller.train(4)
    controller.close()
    assert _steps(tmp_path)["seen"] == [2, 4]
