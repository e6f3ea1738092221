"""JAX `data="stack"` with `pipeline_chunks`: one `train(n)` split into several compiled
calls, the next call's batches pulled while the last runs. Same bits as one call, every
pulled batch consumed (so resume is exact), few compilations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import looproto  # noqa: E402
from looproto import summary  # noqa: E402
from looproto.backends import jax as jax_backend  # noqa: E402
from looproto.backends.jax._batches import part_length  # noqa: E402
from looproto.backends.jax._options import PIPELINE_CHUNKS, parse_backend_options  # noqa: E402
from looproto.checkpoint import CheckpointManager  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from looproto.module import variables_by_path  # noqa: E402
from tests.helpers import scalars  # noqa: E402

LR = 0.05


def _data(n: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)}


class Net(looproto.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(1)
        with self.name_scope:
            self.w1 = looproto.Variable(jnp.asarray(rng.normal(size=(5, 16)).astype(np.float32)))
            self.b1 = looproto.Variable(jnp.zeros(16, jnp.float32))
            self.w2 = looproto.Variable(jnp.asarray(rng.normal(size=(16, 1)).astype(np.float32)))


class Trainer(looproto.StandardTrainer):
    __test__ = False

    def __init__(self, pipeline: int, dataset: Any = None, data: str = "stack") -> None:
        dataset = dataset or ArrayDataset(_data(), 8, shuffle=True, seed=3, epochs=None)
        super().__init__(
            dataset,
            options=looproto.StandardTrainerOptions(
                backend="jax", backend_options={"pipeline_chunks": pipeline, "data": data}
            ),
        )
        self.net = Net()
        self.global_step = looproto.create_global_step()  # NumPy int64: narrowed by JAX
        self.seen = looproto.Variable(np.float32(0), trainable=False)  # NumPy, not narrowed
        self.loss = looproto.Variable(jnp.float32(0), trainable=False)
        self.traces = 0

    def train_step(self, iterator: Any) -> None:
        self.traces += 1
        batch = next(iterator)
        net = self.net

        def loss_fn() -> Any:
            h = jnp.tanh(batch["x"] @ net.w1.value + net.b1.value)
            return jnp.mean((h @ net.w2.value - batch["y"]) ** 2)

        loss, grads = jax_backend.value_and_grad(loss_fn, net)
        for path, variable in variables_by_path(net).items():
            variable.assign(variable.value - LR * grads[path])
        self.loss.assign(loss)
        self.seen.assign_add(jnp.sum(batch["x"][:, 0]))
        summary.scalar("step_loss", loss)
        summary.histogram("h", net.b1.value)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return {"loss": self.loss.value, "seen": self.seen.value}


def _state(trainer: Trainer) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v.value) for k, v in variables_by_path(trainer.net).items()}
    out.update(
        step=np.asarray(trainer.global_step.value),
        seen=np.asarray(trainer.seen.value),
        loss=np.asarray(trainer.loss.value),
    )
    return out


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_default_pipelines_and_one_is_a_single_call() -> None:
    assert PIPELINE_CHUNKS == {"cpu": 1, "accelerator": 4}
    on_cpu = jax.devices()[0].platform == "cpu"
    assert parse_backend_options({})["pipeline_chunks"] == (1 if on_cpu else 4)
    assert parse_backend_options({"pipeline_chunks": 3})["pipeline_chunks"] == 3
    assert part_length(100, 1) == 100
    assert [part_length(n, 4) for n in (100, 40, 30, 17, 16, 10, 3)] == [25, 10, 10, 17, 8, 10, 3]
    with pytest.raises(looproto.ConfigError, match="pipeline_chunks"):
        Trainer(0).train(1)


@pytest.mark.parametrize("data", ["stack", "device"])
def test_pipelined_loops_are_bit_identical_to_one_call(data: str) -> None:
    one, four = Trainer(1, data=data), Trainer(4, data=data)
    for n in (40, 30, 17, 40, 3, 100):
        out_one, out_four = one.train(n), four.train(n)
        _assert_same(out_one, out_four)
        _assert_same(_state(one), _state(four))
        assert one.global_step.dtype == four.global_step.dtype == np.int64
        assert isinstance(four.global_step.value, np.ndarray)  # Back to NumPy at the end.
        assert isinstance(four.seen.value, jax.Array)
    assert int(four.global_step) == 230
    # 40 -> 4 x 10; 30 -> 3 x 10; 17 (prime): 17; 3; 100 -> 4 x 25: lengths 10, 17, 3,
    # 25, one trace each, and the first again once it has found the summaries' slots.
    assert four.traces == 5
    assert four._train_loop_fn.trace_count == 5  # type: ignore[attr-defined]
    assert one.traces == 6  # lengths 40, 30, 17, 3, 100


def test_the_data_ending_inside_a_chunk_loses_nothing() -> None:
    # 60 examples, batch 8, the remainder kept: 7 full batches and one of 4.
    def run(pipeline: int) -> tuple[Trainer, list[int]]:
        trainer = Trainer(pipeline, ArrayDataset(_data(60), 8, drop_remainder=False))
        steps = [int(trainer.train(40) is not None and trainer.global_step)]
        steps.append(int(trainer.train(40) is not None and trainer.global_step))
        return trainer, steps

    one, steps_one = run(1)
    four, steps_four = run(4)
    assert steps_one == steps_four == [8, 8]
    np.testing.assert_allclose(float(four.seen), _data(60)["x"][:, 0].sum(), rtol=1e-5)
    _assert_same(_state(one), _state(four))


def test_until_the_data_ends_in_pipelined_chunks() -> None:
    def run(pipeline: int) -> Trainer:
        trainer = Trainer(pipeline, ArrayDataset(_data(), 8))  # 12 batches, one epoch
        trainer.train(-1)
        return trainer

    one, four = run(1), run(4)
    assert int(four.global_step) == 12
    _assert_same(_state(one), _state(four))


def test_in_step_summaries_are_the_last_steps(tmp_path: Path) -> None:
    def run(pipeline: int, where: Path) -> dict[str, Any]:
        trainer = Trainer(pipeline)
        controller = looproto.Controller(
            trainer=trainer,
            global_step=trainer.global_step,
            steps_per_loop=40,
            summary_interval=40,
            summary_dir=str(where),
        )
        controller.train(120, checkpoint_at_completion=False)
        controller.close()
        return scalars(where)

    one, four = run(1, tmp_path / "one"), run(4, tmp_path / "four")
    assert [s for s, _ in four["step_loss"]] == [40, 80, 120]
    one.pop("steps_per_second"), four.pop("steps_per_second")
    assert one == four


def _controller(directory: Path, trainer: Trainer) -> looproto.Controller:
    manager = CheckpointManager(
        directory / "ckpt",
        trainer,
        step_counter=trainer.global_step,
        checkpoint_interval=32,
        max_to_keep=3,
        enable_async=False,
    )
    return looproto.Controller(
        trainer=trainer,
        global_step=trainer.global_step,
        steps_per_loop=32,
        checkpoint_manager=manager,
        summary_dir=str(directory / "summaries"),
        preemption_signals=None,
    )


def test_resume_mid_run_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    # An epoch is 12 batches: checkpoints at 32 and 64 fall inside epochs (shuffled).
    uninterrupted = Trainer(4)
    with _controller(tmp_path / "whole", uninterrupted) as controller:
        controller.train(96)
    first = Trainer(4)
    with _controller(tmp_path / "cut", first) as controller:
        controller.train(64)
    resumed = Trainer(4)
    with _controller(tmp_path / "cut", resumed) as controller:
        assert int(resumed.global_step) == 64
        controller.train(96)
    _assert_same(_state(uninterrupted), _state(resumed))
    # And the same as never pipelining.
    plain = Trainer(1)
    with _controller(tmp_path / "plain", plain) as controller:
        controller.train(96)
    _assert_same(_state(plain), _state(resumed))


def test_nnx_objects_and_pytree_variables_pipeline_bit_identically() -> None:
    pytest.importorskip("flax.nnx")
    from tests.backends import test_jax_state as state

    def run(pipeline: int) -> Any:
        options = looproto.StandardTrainerOptions(
            backend="jax", backend_options={"pipeline_chunks": pipeline}
        )
        trainer = state.NnxTrainer(steps=80, options=options)
        trainer.train(40)
        trainer.train(40)
        return trainer

    one, four = run(1), run(4)
    assert four._train_loop_fn.trace_count == 1  # Four calls of 10 steps, twice.
    np.testing.assert_array_equal(one.losses.numpy(), four.losses.numpy())
    got, want = (
        state.nnx_state(four.model, four.optimizer),
        state.nnx_state(one.model, one.optimizer),
    )
    assert len(got) == len(want) > 20
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert int(four.model.drop.rngs.count[...]) == 80


def test_an_iterator_failing_mid_loop_leaves_the_steps_that_ran_written_back() -> None:
    batch = next(iter(ArrayDataset(_data(), 8)))

    class Failing:
        def __init__(self) -> None:
            self.n = 0

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> Any:
            self.n += 1
            if self.n > 25:
                raise RuntimeError("the data source failed")
            return batch

    trainer = Trainer(4, Failing())
    with pytest.raises(RuntimeError, match="data source failed"):
        trainer.train(40)  # Calls of 10 steps: two ran before the third's pull failed.
    assert int(trainer.global_step) == 20
    assert isinstance(trainer.global_step.value, np.ndarray)
    assert trainer.global_step.dtype == np.int64
    assert not isinstance(trainer.net.w1.value, jax.core.Tracer)
