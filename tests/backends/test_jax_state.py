"""The JAX backend's compiled loop with real framework state: Flax NNX, optax, pytrees.

* Flax NNX objects (`nnx.Module` with Linear, BatchNorm, Dropout on `nnx.Rngs`; an
  `nnx.Optimizer` running `optax.adamw` with a warm-up/cosine schedule) held by a
  trainer run inside the one `jit(lax.scan)` call, and give what a hand-written
  `nnx.jit` loop gives;
* a `looproto.Variable` holding a pytree (an optax state, a params dict) is lifted,
  differentiated, checkpointed leaf by leaf and restored;
* a step that reads state its loop does not carry (a closure over another trainer's
  variables) raises `StaleReadError` at trace time instead of baking the value in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import looproto  # noqa: E402
from looproto.backends import jax as jax_backend  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from looproto.errors import ConfigError, ProtocolError, ShapeError, StaleReadError  # noqa: E402
from looproto.module import (  # noqa: E402
    TreeVariable,
    backend_for_variable,
    variable_to_numpy,
    variables_by_path,
)

JAX = looproto.StandardTrainerOptions(backend="jax")


def make_data(n: int = 256, seed: int = 0, linear: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-0.5], [0.25], [2.0]], np.float32)
    return {"x": x, "y": (y if linear else np.sin(y)).astype(np.float32)}


class Net(nnx.Module):
    def __init__(self, rngs: Any) -> None:
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.l2(self.drop(nnx.relu(self.norm(self.l1(x)))))


def make_model() -> Net:
    return Net(nnx.Rngs(params=0, dropout=1))


def make_optimizer(model: Net) -> Any:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=5, decay_steps=60)
    return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-3), wrt=nnx.Param)


def nnx_state(*objects: Any) -> list[np.ndarray]:
    """Every NNX variable's value (key data for RNG keys), in NNX's graph order."""
    out = []
    for _, node in nnx.iter_graph(objects):
        if isinstance(node, nnx.Variable):
            value = node.get_raw_value()
            if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            out.append(np.asarray(value))
    return out


class NnxTrainer(looproto.StandardTrainer):
    """Stateful NNX code as NNX users write it; each step's loss kept in `losses`."""

    def __init__(self, steps: int = 40, grads_by: str = "nnx", options: Any = JAX) -> None:
        super().__init__(ArrayDataset(make_data(), 32, epochs=None), options=options)
        self.model = make_model()
        self.optimizer = make_optimizer(self.model)
        self.global_step = looproto.create_global_step()
        self.losses = looproto.Variable(jnp.zeros(steps), trainable=False)
        self.grads_by = grads_by

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        if self.grads_by == "nnx":

            def loss_of(model: Any) -> Any:
                return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

            loss, grads = nnx.value_and_grad(loss_of)(self.model)
        else:  # looproto's, over the NNX model or over the whole trainer

            def loss_fn() -> Any:
                return jnp.mean((self.model(batch["x"]) - batch["y"]) ** 2)

            if self.grads_by == "looproto-model":
                loss, grads = jax_backend.value_and_grad(loss_fn, self.model)
            else:
                loss, by_path = jax_backend.value_and_grad(loss_fn, self)
                grads = by_path["model"]
        self.optimizer.update(self.model, grads)
        self.losses.assign(self.losses.value.at[self.global_step.value].set(loss))
        self.global_step.assign_add(1)


def nnx_jit_reference(steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The same training written by hand with `nnx.jit`: final state and per-step losses."""
    model, iterator = make_model(), iter(ArrayDataset(make_data(), 32, epochs=None))
    optimizer = make_optimizer(model)

    @nnx.jit
    def step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
        def loss_of(model: Any) -> Any:
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for _ in range(steps):
        batch = next(iterator)
        losses.append(float(step(model, optimizer, batch["x"], batch["y"])))
    return nnx_state(model, optimizer), np.asarray(losses, np.float32)


# -- Flax NNX in the compiled loop ----------------------------------------------------


@pytest.mark.parametrize("grads_by", ["nnx", "looproto-model", "looproto-trainer"])
def test_nnx_model_and_optimizer_in_the_compiled_loop_match_an_nnx_jit_loop(
    grads_by: str,
) -> None:
    trainer = NnxTrainer(grads_by=grads_by)
    for _ in range(4):
        trainer.train(10)
    assert trainer._train_loop_fn.trace_count == 1  # One compilation for four calls.
    expected_state, expected_losses = nnx_jit_reference(40)
    np.testing.assert_allclose(trainer.losses.numpy(), expected_losses, rtol=1e-5, atol=1e-7)
    got = nnx_state(trainer.model, trainer.optimizer)
    assert len(got) == len(expected_state) > 20  # every parameter, statistic, moment, count
    for a, b in zip(got, expected_state):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(trainer.optimizer.step[...]) == 40
    assert int(trainer.model.drop.rngs.count[...]) == 40  # One dropout draw per step.
    # Written back as concrete arrays, never tracers; the loss fell.
    assert not isinstance(trainer.model.l1.kernel[...], jax.core.Tracer)
    losses = trainer.losses.numpy()
    assert losses[-10:].mean() < 0.7 * losses[:10].mean()


class DropoutProbe(looproto.StandardTrainer):
    """Records each step's dropout mask of a batch of ones."""

    def __init__(self, steps: int) -> None:
        super().__init__(None, options=JAX)
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
        self.step = looproto.create_global_step()
        self.masks = looproto.Variable(jnp.zeros((steps, 64)), trainable=False)

    def train_step(self, iterator: Any) -> None:
        mask = self.drop(jnp.ones(64)) > 0
        self.masks.assign(self.masks.value.at[self.step.value].set(mask))
        self.step.assign_add(1)


def test_dropout_draws_a_new_mask_every_step_and_resumes_its_stream() -> None:
    probe = DropoutProbe(12)
    probe.train(6)
    probe.train(6)
    masks = probe.masks.numpy()
    assert int(probe.drop.rngs.count[...]) == 12
    assert len({row.tobytes() for row in masks}) == 12  # 12 different masks
    # The same stream drawn eagerly, one call per step, gives the same masks.
    eager = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    for row in masks:
        np.testing.assert_array_equal(row, np.asarray(eager(jnp.ones(64)) > 0))


def test_nnx_checkpoint_restores_the_whole_training_state(tmp_path: Any) -> None:
    straight = NnxTrainer()
    straight.train(20)
    straight.train(20)

    first = NnxTrainer()
    first.train(20)
    with looproto.CheckpointManager(str(tmp_path), first) as manager:
        manager.save(checkpoint_number=20)
    saved = looproto.checkpoint.read_metadata(str(tmp_path))["tree"]
    for path in ("model/drop/rngs/count", "model/norm/mean", "optimizer/opt_state/0/mu/l1/kernel"):
        assert path in saved, sorted(saved)
    resumed = NnxTrainer()
    looproto.CheckpointManager(str(tmp_path), resumed).restore(20)
    resumed.train(20)
    expected = variables_by_path(straight)
    for path, variable in variables_by_path(resumed).items():
        np.testing.assert_array_equal(
            variable_to_numpy(variable), variable_to_numpy(expected[path]), err_msg=path
        )


def test_a_changed_nnx_structure_compiles_anew_and_is_not_trained_stale() -> None:
    trainer = NnxTrainer()
    trainer.train(5)
    loop = trainer._train_loop_fn
    trainer.model.eval()  # Static attributes change: Dropout off, BatchNorm frozen.
    count = int(trainer.model.drop.rngs.count[...])
    mean = np.array(trainer.model.norm.mean[...])  # a copy: the array is donated
    trainer.train(5)
    assert loop.trace_count == 2
    assert int(trainer.model.drop.rngs.count[...]) == count  # no dropout draws in eval mode
    np.testing.assert_array_equal(trainer.model.norm.mean[...], mean)
    trainer.model.train()
    trainer.train(5)
    assert loop.trace_count == 2  # Back to the first structure: its compilation is reused.
    assert int(trainer.model.drop.rngs.count[...]) == count + 5


def test_structure_changes_and_leaks_inside_the_step_are_refused() -> None:
    class Grows(NnxTrainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.model.extra = nnx.Param(jnp.zeros(3))

    with pytest.raises(ProtocolError, match="changed the structure of a Flax NNX object"):
        Grows().train(2)

    class Leaks(NnxTrainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.kept = self.model

    with pytest.raises(jax_backend.TracerLeakError, match=r"\['kept'\]"):
        Leaks().train(2)

    class Replaces(NnxTrainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.model = make_model()

    trainer = Replaces()
    original = trainer.model
    with pytest.raises(ProtocolError, match=r"replaced the Flax NNX objects at \['model'\]"):
        trainer.train(2)
    assert trainer.model is original  # Every place holds its original again.


def test_nnx_state_the_loop_cannot_carry_is_refused_by_name() -> None:
    class Masked(nnx.Module):
        def __init__(self) -> None:
            self.linear = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
            self.mask = nnx.data(jnp.ones(2))  # an array outside any `nnx.Variable`

    class Holder(looproto.StandardTrainer):
        def __init__(self, held: Any) -> None:
            super().__init__(None, options=JAX)
            self.held = held
            self.step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            self.step.assign_add(1)

    with pytest.raises(ConfigError, match=r"`Masked\.mask` as data outside an `nnx\.Variable`"):
        Holder(Masked()).train(1)
    with pytest.raises(ConfigError, match=r"'held/0' is held in a tuple"):
        Holder((nnx.Linear(2, 1, rngs=nnx.Rngs(0)),)).train(1)
    in_a_list = Holder([nnx.Linear(2, 1, rngs=nnx.Rngs(0))])
    in_a_list.train(1)  # lists and dicts are fine
    assert int(in_a_list.step) == 1


def test_looproto_value_and_grad_over_an_nnx_model_equals_nnx_value_and_grad() -> None:
    trainer = NnxTrainer()
    batch = make_data(32)

    def loss_fn() -> Any:
        return jnp.mean((trainer.model(batch["x"]) - batch["y"]) ** 2)

    reference = make_model()
    loss, grads = jax_backend.value_and_grad(loss_fn, trainer)  # eagerly, over the trainer
    ref_loss, ref_grads = nnx.value_and_grad(lambda m: jnp.mean((m(batch["x"]) - batch["y"]) ** 2))(
        reference
    )
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads["model"]), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert "optimizer" not in grads  # It has no `Param`s.
    # What `fn` changed besides the parameters is kept: the batch statistics, the RNG.
    np.testing.assert_allclose(trainer.model.norm.mean[...], reference.norm.mean[...])
    assert int(trainer.model.drop.rngs.count[...]) == 1


# -- Variables holding pytrees --------------------------------------------------------

TX = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 200))


class OptaxTrainer(looproto.StandardTrainer):
    """Plain optax: the params and the optimizer state are one `Variable` each."""

    def __init__(self) -> None:
        super().__init__(ArrayDataset(make_data(), 32, epochs=None), options=JAX)
        rng = np.random.default_rng(3)
        params = {"w": jnp.asarray(rng.normal(size=(4, 1)), jnp.float32), "b": jnp.zeros(1)}
        with self.name_scope:
            self.params = looproto.Variable(params, name="params")
            self.opt_state = looproto.Variable(TX.init(params), trainable=False, name="opt")
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)

        def loss_fn() -> Any:
            p = self.params.value
            return jnp.mean((jnp.tanh(batch["x"] @ p["w"] + p["b"]) - batch["y"]) ** 2)

        _, grads = jax_backend.value_and_grad(loss_fn, self)
        updates, state = TX.update(grads["params"], self.opt_state.value, self.params.value)
        self.params.assign(optax.apply_updates(self.params.value, updates))
        self.opt_state.assign(state)
        self.global_step.assign_add(1)


def test_pytree_variables_train_checkpoint_and_resume_like_an_uninterrupted_run(
    tmp_path: Any,
) -> None:
    straight = OptaxTrainer()
    assert isinstance(straight.opt_state, TreeVariable)
    assert backend_for_variable(straight.opt_state).name == "jax"  # by its leaves
    straight.train(30)
    straight.train(30)

    first = OptaxTrainer()
    first.train(30)
    assert first._train_loop_fn.trace_count == 1
    assert int(first.opt_state.value[0].count) == 30
    with looproto.CheckpointManager(str(tmp_path), first) as manager:
        manager.save(checkpoint_number=30)
    tree = looproto.checkpoint.read_metadata(str(tmp_path))["tree"]
    assert {"opt_state/0/count", "opt_state/0/mu/w", "opt_state/2/count", "params/b"} <= set(tree)
    assert tree["opt_state/0/mu/w"]["shape"] == [4, 1]

    resumed = OptaxTrainer()
    looproto.CheckpointManager(str(tmp_path), resumed).restore(30)
    assert int(resumed.opt_state.value[0].count) == 30
    assert isinstance(resumed.params.value["w"], jax.Array)
    resumed.train(30)
    for got, want in ((resumed.params, straight.params), (resumed.opt_state, straight.opt_state)):
        for a, b in zip(jax.tree.leaves(got.numpy()), jax.tree.leaves(want.numpy())):
            np.testing.assert_array_equal(a, b)


def test_a_pytree_variable_keeps_its_structure_shapes_and_dtypes() -> None:
    state = looproto.Variable(TX.init({"w": jnp.zeros((4, 1))}), trainable=False, name="opt")
    assert state.shape[0].mu == {"w": (4, 1)}
    assert state.dtype[0].count == np.int32
    changed = TX.init({"w": jnp.zeros((4, 2))})
    with pytest.raises(ShapeError, match=r"shape \(4, 2\).*'opt:0' at '0/mu/w'"):
        state.assign(changed)
    with pytest.raises(ShapeError, match="keys"):
        state.assign(TX.init({"v": jnp.zeros((4, 1))}))
    with pytest.raises(jax_backend.TracerLeakError):  # A bare jit would leak its tracers.
        jax.jit(lambda: state.assign(jax.tree.map(lambda x: x + 1, state.value)) and None)()
    assert not isinstance(state.value[0].mu["w"], jax.core.Tracer)


# -- No stale reads ----------------------------------------------------------------


class Regression(looproto.StandardTrainer):
    def __init__(self) -> None:
        super().__init__(ArrayDataset(make_data(linear=True), 32, epochs=None), options=JAX)
        self.w = looproto.Variable(jnp.zeros((4, 1)), name="w")
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        loss_fn = lambda: jnp.mean((batch["x"] @ self.w.value - batch["y"]) ** 2)  # noqa: E731
        _, grads = jax_backend.value_and_grad(loss_fn, self)
        self.w.assign(self.w.value - 0.1 * grads["w"])
        self.global_step.assign_add(1)


class LossEvaluator(looproto.StandardEvaluator):
    """Mean squared error of `predict`, in a compiled loop."""

    def __init__(self, predict: Any = None, linear: bool = False) -> None:
        super().__init__(
            ArrayDataset(make_data(seed=1, linear=linear), 64),
            options=looproto.StandardEvaluatorOptions(backend="jax", use_compiled_loop=True),
        )
        if predict is not None:
            self.predict = predict
        self.total = looproto.Variable(jnp.float32(0), trainable=False)

    def eval_begin(self) -> None:
        self.total.assign(jnp.float32(0))

    def eval_step(self, iterator: Any) -> None:
        batch = next(iterator)
        self.total.assign_add(jnp.mean((self.predict(batch["x"]) - batch["y"]) ** 2))

    def eval_end(self) -> dict[str, float]:
        return {"loss": float(self.total.value)}


def test_an_evaluator_reaching_the_trainer_through_a_closure_raises_at_trace_time() -> None:
    trainer = Regression()
    stale = LossEvaluator(lambda x: x @ trainer.w.value, linear=True)
    with pytest.raises(StaleReadError, match=r"'w:0'.*not carry it.*closure.*self\.model"):
        stale.evaluate(-1)

    # Held as an attribute, the trainer's Variables are part of the evaluator's loop.
    def held() -> LossEvaluator:
        evaluator = LossEvaluator(linear=True)
        evaluator.trainer = trainer
        evaluator.predict = lambda x: x @ evaluator.trainer.w.value
        return evaluator

    evaluator = held()
    before = evaluator.evaluate(-1)["loss"]
    trainer.train(200)
    after = evaluator.evaluate(-1)["loss"]
    assert evaluator._eval_loop_fn.trace_count == 1  # The same compiled program...
    assert after < 1e-3 * before  # ...reads the current weights,
    assert after == held().evaluate(-1)["loss"]  # as an evaluator built now does.


def test_nnx_state_reached_through_a_closure_or_a_bound_method_raises() -> None:
    trainer = NnxTrainer()
    trainer.model.eval()  # Reads only: nothing for NNX's own write check to catch.
    held_by = r"Flax NNX variable \(`(Linear|BatchNorm)\.\w+`, shape.*closure"
    with pytest.raises(StaleReadError, match=held_by):
        LossEvaluator(lambda x: trainer.model(x)).evaluate(-1)

    held = LossEvaluator()
    held.model = trainer.model
    held.predict = trainer.model.__call__  # Bound to the original, not the traced copy.
    with pytest.raises(StaleReadError, match=r"'model/\w+/\w+' of the original object"):
        held.evaluate(-1)

    held.predict = lambda x: held.model(x)  # Through the attribute: fine.
    assert np.isfinite(held.evaluate(-1)["loss"])

    class WritesThroughAClosure(NnxTrainer):
        def __init__(self) -> None:
            super().__init__()
            self.model.train()
            self.forward = self.model.__call__

        def train_step(self, iterator: Any) -> None:
            self.forward(next(iterator)["x"])  # updates the original's batch statistics

    with pytest.raises(ProtocolError, match="reference kept from before"):
        WritesThroughAClosure().train(1)
