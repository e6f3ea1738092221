"""The JAX backend: compiled loop, gradients, guards, checkpoints, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import looproto  # noqa: E402
from looproto import backends  # noqa: E402
from looproto.backends import LoopOptions  # noqa: E402
from looproto.backends import jax as jax_backend  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from looproto.errors import ConfigError, ProtocolError, ShapeError  # noqa: E402
from looproto.module import (  # noqa: E402
    assign_variable,
    is_trainable,
    variable_to_numpy,
    variables_by_path,
)

BACKEND = backends.get("jax")
LR = 0.1


def make_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5]], np.float32))
    return {"x": x, "y": y.astype(np.float32)}


def init_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b1": np.zeros(4, np.float32),
        "b2": np.zeros(1, np.float32),
        "w1": (rng.normal(size=(3, 4)) * 0.5).astype(np.float32),
        "w2": (rng.normal(size=(4, 1)) * 0.5).astype(np.float32),
    }


def mlp_loss(p: dict[str, Any], x: Any, y: Any) -> Any:
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


class Model(looproto.Module):
    def __init__(self, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        with self.name_scope:
            for key, value in params.items():
                setattr(self, key, looproto.Variable(jnp.asarray(value), name=key))

    def __call__(self, x: Any) -> Any:
        h = jnp.tanh(x @ self.w1.value + self.b1.value)
        return h @ self.w2.value + self.b2.value


class Trainer(looproto.StandardTrainer):
    def __init__(self, dataset: Any, options: Any = None, params: Any = None) -> None:
        super().__init__(dataset, options=options)
        self.model = Model(params or init_params())
        self.global_step = looproto.create_global_step()
        self.traces = 0

    def train_step(self, iterator: Any) -> Any:
        self.traces += 1  # Python side effect: runs once per trace under jit.
        batch = next(iterator)

        def loss_fn() -> Any:
            return jnp.mean((self.model(batch["x"]) - batch["y"]) ** 2)

        loss, grads = jax_backend.value_and_grad(loss_fn, self.model)
        for path, variable in variables_by_path(self.model).items():
            variable.assign(variable.value - LR * grads[path])
        self.global_step.assign_add(1)
        return {"loss": loss}


def reference(data: dict[str, np.ndarray], steps: int, batch: int = 8) -> dict[str, np.ndarray]:
    """A hand-written jit + lax.scan loop over the same batches."""
    n = steps * batch
    reps = -(-n // len(data["x"]))
    xs = np.concatenate([data["x"]] * reps)[:n].reshape(steps, batch, -1)
    ys = np.concatenate([data["y"]] * reps)[:n].reshape(steps, batch, -1)

    def body(p: Any, xy: Any) -> Any:
        g = jax.grad(mlp_loss)(p, *xy)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), None

    params = {k: jnp.asarray(v) for k, v in init_params().items()}
    final = jax.jit(lambda p, a, b: lax.scan(body, p, (a, b))[0])(params, xs, ys)
    return {k: np.asarray(v) for k, v in final.items()}


def model_params(trainer: Trainer) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.value) for k, v in variables_by_path(trainer.model).items()}


# -- contract ------------------------------------------------------------------


def test_check_backend() -> None:
    from looproto import testing

    testing.check_backend(BACKEND, make_variable=lambda a: looproto.Variable(jnp.asarray(a)))
    assert BACKEND.name == "jax"
    assert isinstance(BACKEND, backends.Backend)


def test_assign_keeps_dtype_and_sharding() -> None:
    v = looproto.Variable(jnp.zeros((2, 3), jnp.float32))
    assign_variable(v, np.ones((2, 3), np.float64))  # Same kind: cast.
    assert isinstance(v.value, jax.Array)
    assert v.value.dtype == jnp.float32
    assert v.value.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    np.testing.assert_array_equal(variable_to_numpy(v), np.ones((2, 3)))
    with pytest.raises(ShapeError, match="dtype"):
        BACKEND.assign(v, np.ones((2, 3), np.complex64))


def test_to_host_one_transfer_of_tree() -> None:
    out = BACKEND.to_host({"a": jnp.arange(3), "b": {"c": jnp.float32(2.5)}, "n": 3})
    assert isinstance(out["a"], np.ndarray)
    assert out["b"]["c"] == 2.5
    assert out["n"] == 3
    nest = (jnp.ones(2), [jnp.int32(4)])
    # Explicit, like `jax.device_get`: allowed under a guard that disallows implicit
    # transfers. (On CPU no copy is guarded; on an accelerator the early
    # `copy_to_host_async` is one, so `to_host` starts it inside its own "allow".)
    with jax.transfer_guard_device_to_host("disallow"):
        pair = BACKEND.to_host(nest)
    assert isinstance(pair, tuple) and isinstance(pair[1], list)
    np.testing.assert_array_equal(pair[0], np.ones(2))
    assert pair[1][0] == 4 and isinstance(pair[1][0], np.ndarray)


# -- the compiled loop ---------------------------------------------------------


def test_matches_hand_written_scan_and_retraces_only_on_new_length() -> None:
    data = make_data()
    trainer = Trainer(ArrayDataset(data, 8, epochs=None))
    trainer.train(5)
    trainer.train(5)
    trainer.train(5)
    assert trainer.traces == 1  # One trace for three loops of the same shape.
    trainer.train(3)
    assert trainer.traces == 2  # A new num_steps is a new scan length.
    trainer.train(3)
    assert trainer.traces == 2
    assert trainer._train_loop_fn.trace_count == 2  # type: ignore[attr-defined]
    assert int(trainer.global_step) == 21
    assert trainer.global_step.dtype == np.int64  # Dtype kept (JAX ran it in int32).
    expected = reference(data, 21)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)
        assert isinstance(trainer.model.w1.value, jax.Array)


@pytest.mark.parametrize(
    "options",
    [
        looproto.StandardTrainerOptions(use_compiled_loop=False),
        looproto.StandardTrainerOptions(use_compiled_loop=False, use_compiled_step=False),
        looproto.StandardTrainerOptions(backend_options={"data": "device"}),
    ],
    ids=["jit-step", "eager", "device-data"],
)
def test_other_loop_kinds_match(options: Any) -> None:
    data = make_data()
    trainer = Trainer(ArrayDataset(data, 8, epochs=None), options=options)
    trainer.train(2)
    trainer.train(3)
    expected = reference(data, 5)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)
    if options.use_compiled_step:
        assert trainer.traces == (2 if options.use_compiled_loop else 1)


def test_short_final_loop_keeps_every_sample() -> None:
    # 64 examples, batch 10, keep the remainder: 6 full batches + one of 4.
    data = {"x": np.arange(64, dtype=np.float32)}

    class Sum(looproto.StandardTrainer):
        def __init__(self, data_mode: str) -> None:
            super().__init__(
                ArrayDataset(data, 10, drop_remainder=False),
                options=looproto.StandardTrainerOptions(backend_options={"data": data_mode}),
            )
            self.total = looproto.Variable(jnp.float32(0), trainable=False)
            self.seen = looproto.Variable(jnp.int32(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            x = next(iterator)["x"]
            self.total.assign_add(jnp.sum(x))
            self.seen.assign_add(x.shape[0])

    for mode in ("stack", "device"):
        trainer = Sum(mode)
        trainer.train(5)
        trainer.train(5)  # Only 2 batches left, of two shapes: still one loop.
        assert int(trainer.seen) == 64, mode
        assert float(trainer.total) == float(data["x"].sum()), mode


def test_until_exhausted_in_chunks() -> None:
    data = make_data(80)
    options = looproto.StandardTrainerOptions(backend_options={"chunk_size": 4})
    trainer = Trainer(ArrayDataset(data, 8), options=options)
    trainer.train(-1)
    assert int(trainer.global_step) == 10
    expected = reference(data, 10)
    for key, value in model_params(trainer).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6)


def test_variables_are_current_when_loop_end_runs_and_buffers_donated() -> None:
    class Check(Trainer):
        def train_loop_end(self) -> Any:
            return {"w1": self.model.w1.numpy()}

    trainer = Check(ArrayDataset(make_data(), 8, epochs=None))
    trainer.train(1)
    before = trainer.model.w1.value
    out = trainer.train(3)
    assert before.is_deleted()  # Donated.
    np.testing.assert_array_equal(out["w1"], trainer.model.w1.numpy())


def test_evaluator_with_reduce_uses_jitted_steps() -> None:
    params = init_params()
    data = make_data(40)

    class Eval(looproto.StandardEvaluator):
        def __init__(self) -> None:
            super().__init__(ArrayDataset(data, 8))
            self.model = Model(params)
            self.traces = 0

        def eval_begin(self) -> Any:
            return {"sse": 0.0, "n": 0}

        def eval_step(self, iterator: Any) -> Any:
            self.traces += 1
            batch = next(iterator)
            return {"sq": jnp.sum((self.model(batch["x"]) - batch["y"]) ** 2)}

        def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
            state["sse"] += float(step_outputs["sq"])
            state["n"] += 8
            return state

        def eval_end(self, *args: Any) -> Any:
            return {"mse": args[0]["sse"] / args[0]["n"]}

    # float32 matmuls at full precision: a GPU's default (TF32-class, ~1e-3 relative
    # per product) puts the per-batch sums and the whole-data reference ~4e-5 apart.
    with jax.default_matmul_precision("highest"):
        evaluator = Eval()
        out = evaluator.evaluate(-1)
        expected = float(mlp_loss({k: jnp.asarray(v) for k, v in params.items()}, **data))
        assert out["mse"] == pytest.approx(expected, rel=1e-5)
        evaluator.evaluate(-1)
        assert evaluator.traces == 1


def test_nested_iterators_and_no_dataset() -> None:
    class Two(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__({"a": range(100), "b": range(100, 200)})
            self.acc = looproto.Variable(jnp.int32(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            self.acc.assign_add(next(iterator["a"]) + next(iterator["b"]))

    two = Two()
    two.train(3)
    assert int(two.acc) == (0 + 1 + 2) + (100 + 101 + 102)

    class NoData(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(None)
            self.n = looproto.Variable(jnp.int32(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            self.n.assign_add(1)

    nodata = NoData()
    nodata.train(7)
    assert int(nodata.n) == 7


# -- gradients -----------------------------------------------------------------


def test_value_and_grad_keys_and_values() -> None:
    params = init_params()
    model = Model(params)
    data = make_data(8)
    loss, grads = BACKEND.value_and_grad(lambda: mlp_loss_module(model, data), model)
    ref_loss, ref_grads = jax.value_and_grad(mlp_loss)(
        {k: jnp.asarray(v) for k, v in params.items()}, data["x"], data["y"]
    )
    assert sorted(grads) == sorted(variables_by_path(model, predicate=is_trainable))
    assert float(loss) == pytest.approx(float(ref_loss))
    for key in params:
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=1e-6)
    (_, aux), _ = jax_backend.value_and_grad(lambda: (loss, {"a": 1}), model, has_aux=True)
    assert aux == {"a": 1}
    g2, aux2 = jax_backend.grad(lambda: (mlp_loss_module(model, data), 2), model, has_aux=True)
    assert aux2 == 2
    np.testing.assert_allclose(g2["w1"], ref_grads["w1"], rtol=1e-6)
    for variable in model.variables:  # Nothing bound is left behind.
        assert isinstance(variable.value, jax.Array)
        assert not isinstance(variable.value, jax.core.Tracer)


def mlp_loss_module(model: Model, data: dict[str, np.ndarray]) -> Any:
    return jnp.mean((model(data["x"]) - data["y"]) ** 2)


def test_value_and_grad_keeps_assigned_state() -> None:
    model = Model(init_params())
    model.calls = looproto.Variable(jnp.int32(0), trainable=False)

    def fn() -> Any:
        model.calls.assign_add(1)
        return jnp.sum(model.w1.value)

    jax_backend.value_and_grad(fn, model)
    assert int(model.calls) == 1
    assert not isinstance(model.calls.value, jax.core.Tracer)


# -- guards and bad input --------------------------------------------------------


def assert_no_tracers(module: looproto.Module) -> None:
    for variable in module.variables:
        assert not isinstance(variable.value, jax.core.Tracer), variable.name


def test_exception_inside_step_leaves_no_tracer() -> None:
    class Boom(Trainer):
        def train_step(self, iterator: Any) -> Any:
            self.model.w1.assign(self.model.w1.value * 2)
            raise RuntimeError("boom")

    trainer = Boom(ArrayDataset(make_data(), 8, epochs=None))
    before = trainer.model.w1.numpy()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(3)
    assert_no_tracers(trainer)
    np.testing.assert_array_equal(trainer.model.w1.numpy(), before)


def test_bare_jit_of_stateful_step_raises() -> None:
    trainer = Trainer(ArrayDataset(make_data(), 8, epochs=None))
    with pytest.raises(jax_backend.TracerLeakError, match="w"):
        jax.jit(lambda: trainer.model.w1.assign(trainer.model.w1.value + 1) and None)()
    assert_no_tracers(trainer)


def test_shape_change_inside_step_names_step_and_variable() -> None:
    class Bad(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.model.b1.assign(jnp.zeros(5))

    trainer = Bad(ArrayDataset(make_data(), 8, epochs=None))
    with pytest.raises(ShapeError, match=r"Bad\.train_step.*b1"):
        trainer.train(2)
    assert_no_tracers(trainer)


def test_non_array_output_raises() -> None:
    class Bad(Trainer):
        def train_step(self, iterator: Any) -> Any:
            next(iterator)
            return {"message": "hello"}

    with pytest.raises(ProtocolError, match=r"Bad\.train_step.*message"):
        Bad(ArrayDataset(make_data(), 8, epochs=None)).train(2)


def test_lazily_created_variable_raises_and_is_scrubbed() -> None:
    class Lazy(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.slot = looproto.Variable(self.model.w1.value * 0)

    trainer = Lazy(ArrayDataset(make_data(), 8, epochs=None))
    with pytest.raises(ProtocolError, match=r"slot.*eagerly"):
        trainer.train(2)
    assert_no_tracers(trainer)


def test_python_control_flow_on_arrays_gets_context() -> None:
    class Branchy(Trainer):
        def train_step(self, iterator: Any) -> None:
            if jnp.sum(next(iterator)["x"]) > 0:
                self.global_step.assign_add(1)

    with pytest.raises(ProtocolError, match=r"Branchy\.train_step.*use_compiled_step=False"):
        Branchy(ArrayDataset(make_data(), 8, epochs=None)).train(2)


def test_two_next_calls_in_one_step_raise() -> None:
    class Greedy(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            next(iterator)

    with pytest.raises(ProtocolError, match="twice"):
        Greedy(ArrayDataset(make_data(), 8, epochs=None)).train(2)


def test_iterator_running_out_mid_loop_is_a_short_loop() -> None:
    trainer = Trainer(ArrayDataset(make_data(40), 8))  # 5 batches
    trainer.train(3)
    trainer.train(3)  # 2 left
    assert int(trainer.global_step) == 5
    trainer.train(3)  # none left: nothing runs, nothing breaks
    assert int(trainer.global_step) == 5


def test_backend_options_are_checked() -> None:
    trainer = Trainer([])
    for bad in ({"nope": 1}, {"data": "disk"}, {"mesh": 4}, {"chunk_size": 0}):
        with pytest.raises(ConfigError):
            BACKEND.make_loop(
                trainer.train_step, module=trainer, options=LoopOptions(backend_options=bad)
            )
    with pytest.raises(ConfigError, match="ArrayDataset"):
        Trainer(
            iter([make_data(8)]),
            options=looproto.StandardTrainerOptions(backend_options={"data": "device"}),
        ).train(1)


def test_name_scope_reaches_jaxpr_only_while_tracing() -> None:
    assert type(BACKEND.name_scope("a/")).__name__ == "nullcontext"

    def f(x: Any) -> Any:
        with looproto.name_scope("outer"):
            return x * 2

    hlo = jax.jit(f).lower(1.0).as_text(debug_info=True)
    assert "outer" in hlo


# -- checkpoints -----------------------------------------------------------------


def test_checkpoints_cross_numpy_and_jax(tmp_path: Any) -> None:
    params = init_params()

    class NumpyModel(looproto.Module):
        def __init__(self, scale: float) -> None:
            super().__init__(name="model")
            with self.name_scope:
                for key, value in params.items():
                    setattr(self, key, looproto.Variable(value * scale, name=key))
            self.step = looproto.create_global_step()

    class JaxModel(NumpyModel):
        def __init__(self, scale: float) -> None:
            super().__init__(scale)
            for variable in self.variables:
                if variable.trainable:
                    variable._value = jnp.asarray(variable.value)

    for source_cls, target_cls in ((NumpyModel, JaxModel), (JaxModel, NumpyModel)):
        source, target = source_cls(2.0), target_cls(0.0)
        source.step.assign(7)
        directory = tmp_path / source_cls.__name__
        manager = looproto.CheckpointManager(str(directory), source)
        manager.save(checkpoint_number=1)
        manager.close()
        looproto.CheckpointManager(str(directory), target).restore(1)
        for path, variable in variables_by_path(target).items():
            np.testing.assert_array_equal(
                variable_to_numpy(variable), variable_to_numpy(variables_by_path(source)[path])
            )
        if target_cls is JaxModel:
            assert isinstance(target.w1.value, jax.Array)
        assert int(target.step) == 7


# -- sharding ----------------------------------------------------------------------

_MESH_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, looproto
    from looproto.data import ArrayDataset
    from jax.sharding import Mesh
    from tests.backends.test_jax import Trainer, make_data, model_params
    # Four CPU devices, also on a machine with an accelerator (JAX_PLATFORMS=cpu).
    cpus = jax.devices("cpu")
    assert len(cpus) == 4 and jax.devices() == cpus, jax.devices()
    data = make_data(64)
    runs = {}
    for name, opts in [("one", {}), ("mesh", {"mesh": Mesh(np.array(cpus), ("data",))}),
                       ("mesh_device", {"mesh": "auto", "data": "device"})]:
        t = Trainer(ArrayDataset(data, 8, epochs=None),
                    options=looproto.StandardTrainerOptions(backend_options=opts))
        t.train(6); t.train(6)
        runs[name] = model_params(t)
        if name != "one":
            assert len(t.model.w1.value.sharding.device_set) == 4
    for name in ("mesh", "mesh_device"):
        for k, v in runs["one"].items():
            np.testing.assert_allclose(runs[name][k], v, rtol=1e-5, atol=1e-6)
    # Pipelined (two calls of 8 steps) over the mesh: as one call on one device.
    loops = {}
    for name, opts in [("one", {"pipeline_chunks": 1}),
                       ("mesh", {"mesh": "auto", "pipeline_chunks": 2})]:
        p = Trainer(ArrayDataset(data, 8, epochs=None),
                    options=looproto.StandardTrainerOptions(backend_options=opts))
        p.train(16)
        loops[name] = model_params(p)
    assert len(p.model.w1.value.sharding.device_set) == 4 and int(p.global_step) == 16
    for k, v in loops["one"].items():
        np.testing.assert_allclose(loops["mesh"][k], v, rtol=1e-5, atol=1e-6)
    # A checkpoint restores into replicated variables and keeps their sharding.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        with looproto.CheckpointManager(tmp, t) as manager:
            manager.save(checkpoint_number=12)
        fresh = Trainer(ArrayDataset(data, 8, epochs=None),
                        options=looproto.StandardTrainerOptions(backend_options={"mesh": "auto"}))
        fresh.train(1)
        sharding = fresh.model.w1.value.sharding
        looproto.CheckpointManager(tmp, fresh).restore(12)
        assert fresh.model.w1.value.sharding == sharding, fresh.model.w1.value.sharding
        assert len(fresh.model.w1.value.sharding.device_set) == 4
        assert int(fresh.global_step) == 12
        for k, v in runs["mesh_device"].items():
            np.testing.assert_array_equal(model_params(fresh)[k], v)
    print("MESH_OK")
    """
)


def test_four_device_mesh_matches_one_device() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # On CPU devices whatever the machine has: the flag makes four of them, and
    # JAX_PLATFORMS keeps an accelerator (which would be the default device) out.
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "src")])
    result = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "MESH_OK" in result.stdout, result.stderr[-3000:]


# -- Flax NNX ------------------------------------------------------------------------


def _nnx_holder(seed: int) -> Any:
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):  # A user subclass: recognised through its MRO.
        def __init__(self, rngs: Any) -> None:
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(4, 2, rngs=rngs)])
            self.tied = self.dense.kernel  # Shared: listed once, at its first path.

    class Holder(looproto.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(nnx.Rngs(seed))
            self.step = looproto.create_global_step()

    return Holder()


def test_nnx_variables_are_discovered_with_paths_and_flags() -> None:
    holder = _nnx_holder(0)
    found = variables_by_path(holder)
    kinds = {path: type(variable).__name__ for path, variable in found.items()}
    assert kinds == {
        "net/dense/bias": "Param",
        "net/dense/kernel": "Param",
        "net/drop/rngs/count": "RngCount",
        "net/drop/rngs/key": "RngKey",
        "net/heads/0/bias": "Param",
        "net/heads/0/kernel": "Param",
        "net/norm/bias": "Param",
        "net/norm/mean": "BatchStat",
        "net/norm/scale": "Param",
        "net/norm/var": "BatchStat",
        "step": "Variable",
    }
    trainable = {path for path, v in found.items() if is_trainable(v)}
    assert trainable == {p for p, kind in kinds.items() if kind == "Param"}
    assert len(holder.trainable_variables) == 6
    assert len(holder.non_trainable_variables) == 5
    assert found["net/dense/kernel"] is holder.net.dense.kernel
    assert BACKEND.to_numpy(found["net/drop/rngs/key"]).dtype == np.uint32  # key data


def test_nnx_checkpoint_round_trips(tmp_path: Any) -> None:
    source, target = _nnx_holder(0), _nnx_holder(1)
    source.net.norm.mean[...] = jnp.arange(4.0)  # Non-trainable state too.
    source.net.drop.rngs.count[...] = jnp.uint32(5)
    source.step.assign(3)
    before = {p: variable_to_numpy(v) for p, v in variables_by_path(source).items()}
    assert not np.array_equal(before["net/dense/kernel"], target.net.dense.kernel[...])
    with looproto.CheckpointManager(str(tmp_path), source) as manager:
        manager.save(checkpoint_number=3)
    looproto.CheckpointManager(str(tmp_path), target).restore(3)
    for path, variable in variables_by_path(target).items():
        np.testing.assert_array_equal(variable_to_numpy(variable), before[path], err_msg=path)
    key = target.net.drop.rngs.key[...]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)  # Still a typed key.
    assert isinstance(target.net.dense.kernel[...], jax.Array)
    assert target.net.heads[0].kernel[...].dtype == jnp.float32
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(key, (3,)), jax.random.uniform(source.net.drop.rngs.key[...], (3,))
    )


def test_nnx_steps_run_in_the_compiled_loop_as_they_do_eagerly() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class NnxTrainer(looproto.StandardTrainer):
        def __init__(self, options: Any = None) -> None:
            super().__init__(ArrayDataset(make_data(), 8, epochs=None), options=options)
            self.net = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> Any:
            batch = next(iterator)

            def loss_fn(net: Any) -> Any:
                return jnp.mean((net(batch["x"]) - batch["y"]) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(self.net)
            params = nnx.state(self.net, nnx.Param)
            nnx.update(self.net, jax.tree.map(lambda p, g: p - LR * g, params, grads))
            self.global_step.assign_add(1)
            return {"loss": loss}

    compiled = NnxTrainer()
    eager = NnxTrainer(
        looproto.StandardTrainerOptions(use_compiled_loop=False, use_compiled_step=False)
    )
    start = eager.net.kernel[...]
    compiled.train(4)
    eager.train(4)
    assert int(eager.global_step) == int(compiled.global_step) == 4
    assert not np.allclose(eager.net.kernel[...], start)
    np.testing.assert_allclose(compiled.net.kernel[...], eager.net.kernel[...], rtol=1e-6)
    assert isinstance(compiled.net.kernel[...], jax.Array)  # written back, not a tracer
    assert not isinstance(compiled.net.kernel[...], jax.core.Tracer)


def test_numpy_and_weak_typed_values_are_lifted_without_retracing() -> None:
    class Mixed(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(None)
            self.weak = looproto.Variable(jnp.asarray(1.0))  # A weak-typed float32.
            self.wide = looproto.Variable(np.float64(0.5), trainable=False)  # Runs as float32.
            self.count = looproto.Variable(np.int32(0), trainable=False)
            self.traces = 0

        def train_step(self, iterator: Any) -> None:
            self.traces += 1
            self.weak.assign(self.weak.value * 2)
            self.wide.assign(self.wide.value + 0.25)
            self.count.assign_add(1)

    trainer = Mixed()
    assert trainer.weak.value.weak_type
    trainer.train(3)
    trainer.train(3)
    assert trainer.traces == 1  # The weak type was dropped before the first trace.
    assert float(trainer.weak.value) == 64.0
    assert not trainer.weak.value.weak_type
    assert trainer.wide.dtype == np.float64 and float(trainer.wide.value) == 2.0
    assert isinstance(trainer.count.value, jax.Array) and int(trainer.count.value) == 6
