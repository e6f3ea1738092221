"""One conformance suite x every backend, so no backend drifts from the contract."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import backends, testing


def _numpy_variable(array: np.ndarray) -> Any:
    return looproto.Variable(array)


def _jax_variable(array: np.ndarray) -> Any:
    import jax.numpy as jnp

    return looproto.Variable(jnp.asarray(array))


def _tf_variable(array: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.Variable(array)


def _torch_parameter(array: np.ndarray) -> Any:
    import torch

    return torch.nn.Parameter(torch.from_numpy(array.copy()))


FACTORIES: dict[str, tuple[str | None, Callable[[np.ndarray], Any]]] = {
    "numpy": (None, _numpy_variable),
    "jax": ("jax", _jax_variable),
    "tensorflow": ("tensorflow", _tf_variable),
    "torch": ("torch", _torch_parameter),
}
# The optional protocols each shipped backend follows (`looproto.backends.Supports*`).
CAPABILITIES = {
    "numpy": ["SupportsArrayAPI"],
    "jax": [
        "SupportsArrayAPI",
        "SupportsAssignHook",
        "SupportsDistributed",
        "SupportsGradients",
        "SupportsHyperparameters",
        "SupportsMetrics",
    ],
    "tensorflow": [
        "SupportsArrayAPI",
        "SupportsAssignHook",
        "SupportsDistributed",
        "SupportsDtypes",
        "SupportsGradients",
        "SupportsHyperparameters",
        "SupportsIteratorState",
        "SupportsMetrics",
    ],
    "torch": [
        "SupportsArrayAPI",
        "SupportsDistributed",
        "SupportsDtypes",
        "SupportsGradients",
        "SupportsHookGate",
        "SupportsHyperparameters",
        "SupportsIteratorState",
        "SupportsMetrics",
        "SupportsStateJSON",
    ],
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_backend_follows_the_contract(name):
    framework, factory = FACTORIES[name]
    if framework is not None:
        pytest.importorskip(framework)
    if name not in backends.available():
        pytest.skip(f"the {name} adapter is not part of this install")
    backend = backends.get(name)
    assert backend.name == name
    assert testing.check_backend(backend, make_variable=factory) == CAPABILITIES[name]


def test_registry_knows_the_builtin_backends_and_default():
    assert "numpy" in backends.available()
    assert backends.get() is backends.get("numpy")
    assert backends.get("np") is backends.get("numpy")


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(looproto.ConfigError, match=r"Unknown backend 'nope'.*numpy"):
        backends.get("nope")


def test_environment_variable_selects_the_default(monkeypatch):
    monkeypatch.setenv("LOOPROTO_BACKEND", "numpy")
    assert backends.default_name() == "numpy"
    monkeypatch.setenv("LOOPROTO_BACKEND", "nope")
    with pytest.raises(looproto.ConfigError, match="LOOPROTO_BACKEND"):
        backends.get()


def test_registered_backend_is_used_by_standard_trainer(monkeypatch):
    numpy_backend = backends.get("numpy")
    calls: list[str] = []

    class Recording:
        name = "recording"

        def __getattr__(self, attr: str) -> Any:
            return getattr(numpy_backend, attr)

        def make_loop(self, step_fn: Any, *, module: Any, options: Any) -> Any:
            calls.append(type(module).__name__)
            return numpy_backend.make_loop(step_fn, module=module, options=options)

    monkeypatch.setattr(backends, "_entries", dict(backends._entries))
    backends.register("recording", Recording)

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(range(5), looproto.StandardTrainerOptions(backend="recording"))
            self.step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            next(iterator)
            self.step.assign_add(1)

    trainer = Trainer()
    testing.check_trainer(trainer, num_steps=3, global_step=trainer.step)
    assert calls == ["Trainer"]


def test_missing_framework_names_the_extra(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name: str, *args: Any) -> Any:
        if name == "looproto.backends.torch._backend":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", fake_import)
    unloaded = {n: dataclasses.replace(e, backend=None) for n, e in backends._entries.items()}
    monkeypatch.setattr(backends, "_entries", unloaded)
    with pytest.raises(looproto.BackendNotAvailableError, match=r"pip install 'looproto\[torch\]'"):
        backends.get("torch")


@pytest.mark.parametrize("kind", ["instance", "class", "factory"])
def test_entry_point_may_name_an_instance_a_class_or_a_factory(monkeypatch, kind):
    from importlib import metadata

    from looproto.backends.numpy import NumpyBackend

    class Plugged(NumpyBackend):
        name = "plugged"

    target = {"instance": Plugged(), "class": Plugged, "factory": lambda: Plugged()}[kind]
    entry = metadata.EntryPoint("plugged", "plugged_pkg:obj", backends.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata.EntryPoint, "load", lambda self: target)
    monkeypatch.setattr(backends, "_entry_points", lambda: {"plugged": entry})
    monkeypatch.setattr(backends, "_entries", dict(backends._entries))
    backend = backends.get("plugged")
    assert isinstance(backend, Plugged)
    assert backends.get("plugged") is backend  # loaded once


class _BatchPopper(looproto.StandardTrainer):
    """Takes the label out of each batch dict, as Orbit's `single_task` example does."""

    __test__ = False

    def __init__(self, dataset: Any, backend: str, compiled: bool) -> None:
        options = looproto.StandardTrainerOptions(
            backend=backend, use_compiled_step=compiled, use_compiled_loop=compiled
        )
        super().__init__(train_dataset=dataset, options=options)
        self.global_step = looproto.create_global_step()
        self.total = looproto.Variable(np.float32(0), trainable=False)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        label = batch.pop("label")
        assert set(batch) == {"x"}
        self.total.assign_add(label[0] + label[1])
        self.global_step.assign_add(1)


# A compiled loop hands the step containers of its own; an eager one, what the iterator
# yields (a Python iterator's own dicts, as in any Python loop).
@pytest.mark.parametrize("source", ["array_dataset", "python_iterator"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_step_may_change_the_batch_it_is_given(name, compiled, source):
    framework, _ = FACTORIES[name]
    if framework is not None:
        pytest.importorskip(framework)
    data = {
        "x": np.arange(12, dtype=np.float32).reshape(6, 2),
        "label": np.arange(6, dtype=np.float32),
    }
    if source == "array_dataset":
        dataset: Any = looproto.data.ArrayDataset(data, batch_size=2)
    else:
        dataset = [
            {"x": data["x"][i : i + 2], "label": data["label"][i : i + 2]} for i in (0, 2, 4)
        ]
    trainer = _BatchPopper(dataset if source == "array_dataset" else iter(dataset), name, compiled)
    trainer.train(3)
    assert int(trainer.global_step) == 3
    assert float(trainer.total.numpy()) == 15.0  # every label, each taken once
    if source == "array_dataset":
        assert set(data) == {"x", "label"}  # each batch is new: the arrays' dict is untouched
