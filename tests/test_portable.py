"""`looproto.portable`: the array API namespace of any framework's arrays, gradients, optimizers."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import portable
from looproto.errors import ConfigError, ProtocolError
from looproto.module import variables_by_path


def test_importing_portable_code_imports_no_framework() -> None:
    code = (
        "import sys, looproto.portable, looproto.examples.portable_mlp; "
        "print(sorted({'jax', 'torch', 'tensorflow', 'array_api_compat'} "
        "& {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------
# array_namespace


def test_numpy_arrays_scalars_and_variables_get_numpy_namespace() -> None:
    xp = portable.array_namespace(np.zeros(3, np.float32))
    assert portable.array_namespace(np.float32(1.0)) is xp
    assert portable.array_namespace(looproto.Variable(np.zeros(2))) is xp
    assert portable.array_namespace(None, 2.0, np.ones(2), 3) is xp  # numbers skipped
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    np.testing.assert_allclose(xp.tanh(x), np.tanh(x))
    assert xp.mean(x).dtype == np.float32


def test_numpy_without_array_api_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    from looproto.backends import numpy as numpy_backend
    from looproto.errors import BackendNotAvailableError

    monkeypatch.setitem(sys.modules, "array_api_compat.numpy", None)  # import fails
    monkeypatch.setattr(np, "__version__", "2.1.0")
    assert numpy_backend.array_namespace() is np  # NumPy 2.1 follows the standard
    monkeypatch.setattr(np, "__version__", "1.26.4")
    with pytest.raises(BackendNotAvailableError, match=r"pip install 'looproto\[portable\]'"):
        numpy_backend.array_namespace()


@pytest.mark.parametrize(
    ("framework", "make", "expected"),
    [
        ("jax", lambda m: m.numpy.zeros(3), "jax.numpy"),
        ("torch", lambda m: m.zeros(3), "array_api_compat.torch"),
        ("tensorflow", lambda m: m.zeros(3), "tensorflow.experimental.numpy"),
    ],
)
def test_each_framework_gets_its_namespace(framework: str, make: Any, expected: str) -> None:
    module = pytest.importorskip(framework)
    if framework == "torch":
        pytest.importorskip("array_api_compat")
    x = make(module)
    xp = portable.array_namespace(x)
    assert xp is portable.array_namespace(make(module))
    name = getattr(xp, "__name__", None) or xp._tnp.__name__
    assert name == expected
    np.testing.assert_allclose(np.asarray(xp.sum(xp.tanh(x) + 1.0)), 3.0)


def test_jax_tracers_get_jax_numpy() -> None:
    jax = pytest.importorskip("jax")
    seen = []

    @jax.jit
    def f(x: Any) -> Any:
        xp = portable.array_namespace(x)
        seen.append(xp)
        return xp.tanh(x)

    f(np.zeros(2, np.float32))
    assert seen == [jax.numpy]


def test_mixed_frameworks_and_no_arrays_are_protocol_errors() -> None:
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ProtocolError, match=r"several frameworks \(\['jaxlib', 'numpy'\]\)"):
        portable.array_namespace(np.zeros(2), jnp.zeros(2))
    with pytest.raises(ProtocolError, match="needs at least one array"):
        portable.array_namespace(1.0, None)


class _OwnNamespace:
    """An array type of no known framework that names its namespace (the standard's way)."""

    def __array_namespace__(self, api_version: str | None = None) -> Any:
        return np


def test_unknown_arrays_use_their_array_namespace_method_or_are_refused() -> None:
    assert portable.array_namespace(_OwnNamespace()) is np
    with pytest.raises(ProtocolError, match=r"No array API namespace.*builtins\.str"):
        portable.array_namespace("not an array")


# ----------------------------------------------------------------------------
# value_and_grad


def _quadratic() -> tuple[looproto.Module, Any]:
    module = looproto.Module(name="m")
    module.w = looproto.Variable(np.array([1.0, 2.0], np.float32), name="w")
    module.steps = looproto.Variable(np.int64(0), trainable=False, name="steps")

    def loss() -> Any:
        xp = portable.array_namespace(module.w.value)
        return xp.sum(module.w.value**2)

    return module, loss


def test_value_and_grad_on_numpy_is_a_config_error_naming_the_trainable_backends() -> None:
    module, loss = _quadratic()
    with pytest.raises(ConfigError, match=r"`numpy` backend cannot differentiate.*train on one of"):
        portable.value_and_grad(loss, module, backend="numpy")


def test_value_and_grad_delegates_to_the_backend_keyed_by_path() -> None:
    pytest.importorskip("jax")
    module, loss = _quadratic()
    value, grads = portable.value_and_grad(loss, module, backend="jax")
    assert float(value) == 5.0
    assert list(grads) == ["w"]
    np.testing.assert_allclose(np.asarray(grads["w"]), [2.0, 4.0])
    (value, aux), grads = portable.value_and_grad(
        lambda: (loss(), 7), module, backend=looproto.backends.get("jax"), has_aux=True
    )
    assert aux == 7


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_has_aux_needs_a_loss_aux_pair_on_every_backend(backend: str) -> None:
    framework = pytest.importorskip(backend)
    module, _ = _quadratic()
    # Outside a loop each backend differentiates its own framework's variables.
    w = np.array([1.0, 2.0], np.float32)
    module.w = {
        "jax": lambda: looproto.Variable(framework.numpy.asarray(w), name="w"),
        "torch": lambda: looproto.Variable(framework.tensor(w), name="w"),
        "tensorflow": lambda: framework.Variable(w, name="w"),
    }[backend]()

    def loss() -> Any:
        x = framework.identity(module.w) if backend == "tensorflow" else module.w.value
        return portable.array_namespace(x).sum(x**2)

    (value, aux), grads = portable.value_and_grad(
        lambda: (loss(), "aux"), module, backend=backend, has_aux=True
    )
    assert aux == "aux"
    assert float(value) == 5.0
    np.testing.assert_allclose(np.asarray(grads["w"]), [2.0, 4.0])
    with pytest.raises(ProtocolError, match=r"must return `\(loss, aux\)`; received"):
        portable.value_and_grad(loss, module, backend=backend, has_aux=True)


# ----------------------------------------------------------------------------
# Optimizers, on NumPy arrays (the same code runs on every framework's arrays)


class _Model(looproto.Module):
    def __init__(self) -> None:
        super().__init__(name="model")
        rng = np.random.default_rng(0)
        with self.name_scope:
            self.layers = [
                {"w": looproto.Variable(rng.normal(size=(3, 2)).astype(np.float32), name="w")},
                {"w": looproto.Variable(rng.normal(size=2).astype(np.float32), name="w")},
            ]
            self.frozen = looproto.Variable(np.ones(2, np.float32), trainable=False)
            self.count = looproto.Variable(np.int64(0))  # trainable, but not floating-point


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {
        "layers/0/w": rng.normal(size=(3, 2)).astype(np.float32),
        "layers/1/w": rng.normal(size=2).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)], ids=str
)
def test_sgd_matches_the_written_out_updates(momentum: float, nesterov: bool) -> None:
    model = _Model()
    sgd = portable.SGD(model, learning_rate=0.1, momentum=momentum, nesterov=nesterov)
    assert sorted(sgd.parameters) == ["layers/0/w", "layers/1/w"]
    params = {p: v.numpy() for p, v in sgd.parameters.items()}
    velocity = {p: np.zeros_like(v) for p, v in params.items()}
    for step in range(5):
        grads = _grads(step)
        sgd.apply(grads)
        for path, g in grads.items():
            velocity[path] = momentum * velocity[path] - 0.1 * g
            update = momentum * velocity[path] - 0.1 * g if nesterov else velocity[path]
            params[path] = params[path] + update
    for path, variable in sgd.parameters.items():
        np.testing.assert_allclose(variable.numpy(), params[path], rtol=1e-6)
        assert variable.dtype == np.float32
        if momentum:
            np.testing.assert_allclose(sgd.velocity[path].numpy(), velocity[path], rtol=1e-6)
    np.testing.assert_array_equal(model.frozen.numpy(), [1.0, 1.0])
    assert int(model.count) == 0


def test_adam_matches_the_written_out_updates() -> None:
    model = _Model()
    adam = portable.Adam(model, learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-6)
    params = {p: v.numpy().astype(np.float64) for p, v in adam.parameters.items()}
    m = {p: np.zeros_like(v) for p, v in params.items()}
    v = {p: np.zeros_like(x) for p, x in params.items()}
    for step in range(1, 6):
        grads = _grads(step)
        adam.apply(grads)
        lr_t = 0.01 * np.sqrt(1 - 0.99**step) / (1 - 0.8**step)
        for path, g in grads.items():
            m[path] = 0.8 * m[path] + 0.2 * g
            v[path] = 0.99 * v[path] + 0.01 * g * g
            params[path] = params[path] - lr_t * m[path] / (np.sqrt(v[path]) + 1e-6)
    assert int(adam.iterations) == 5
    assert adam.iterations.dtype == np.int64
    for path, variable in adam.parameters.items():
        np.testing.assert_allclose(variable.numpy(), params[path], rtol=1e-5)
        np.testing.assert_allclose(adam.m[path].numpy(), m[path], rtol=1e-5)
        np.testing.assert_allclose(adam.v[path].numpy(), v[path], rtol=1e-5)


def test_optimizer_state_is_keyed_by_parameter_path_and_parameters_stay_the_models() -> None:
    trainer = looproto.Module(name="trainer")
    trainer.model = _Model()
    # Named to sort before `model`: its parameters must still be found under `model`.
    trainer.adam = portable.Adam(trainer.model)
    trainer.sgd = portable.SGD(trainer.model, momentum=0.5)
    paths = variables_by_path(trainer)
    assert sorted(paths) == [
        "adam/iterations",
        "adam/m/layers/0/w",
        "adam/m/layers/1/w",
        "adam/v/layers/0/w",
        "adam/v/layers/1/w",
        "model/count",
        "model/frozen",
        "model/layers/0/w",
        "model/layers/1/w",
        "sgd/velocity/layers/0/w",
        "sgd/velocity/layers/1/w",
    ]
    assert paths["model/layers/0/w"] is trainer.model.layers[0]["w"]
    assert paths["sgd/velocity/layers/1/w"].name == "sgd/velocity/layers/1/w:0"
    assert not paths["adam/m/layers/0/w"].trainable


def test_optimizer_bad_input() -> None:
    model = _Model()
    for kwargs, match in (
        ({"learning_rate": 0}, r"`learning_rate` must be a positive number; received 0\."),
        ({"learning_rate": "0.1"}, r"`learning_rate` must be a positive number; received '0\.1'"),
        ({"momentum": 1.0}, r"`momentum` must be a number in \[0, 1\); received 1\.0"),
        ({"nesterov": True}, r"`nesterov=True` needs a `momentum` above 0"),
        ({"nesterov": 1, "momentum": 0.5}, r"`nesterov` must be a bool; received 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            portable.SGD(model, **kwargs)
    with pytest.raises(ConfigError, match=r"`beta_2` must be a number in \[0, 1\)"):
        portable.Adam(model, beta_2=1.5)
    with pytest.raises(ConfigError, match="no trainable floating-point variables"):
        portable.SGD(looproto.Module(name="empty"))
    sgd = portable.SGD(model)
    grads = _grads(0)
    grads["layers/2/w"] = grads.pop("layers/1/w")
    before = {p: v.numpy() for p, v in sgd.parameters.items()}
    with pytest.raises(
        ProtocolError, match=r"missing \['layers/1/w'\], unexpected \['layers/2/w'\]"
    ):
        sgd.apply(grads)
    for path, variable in sgd.parameters.items():
        np.testing.assert_array_equal(variable.numpy(), before[path])  # nothing updated


def test_framework_variables_belong_to_the_frameworks_optimizers() -> None:
    torch = pytest.importorskip("torch")
    module = looproto.Module(name="m")
    module.w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ProtocolError, match=r"'w' is a Parameter; `SGD` updates `looproto"):
        portable.SGD(module)
