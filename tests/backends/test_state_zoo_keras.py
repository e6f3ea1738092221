"""The Keras state zoo on TensorFlow: models, lazily built optimizers, metrics, seeds.

Each case (`_zoo_keras.py`) trains `N` steps in the compiled loop, is checkpointed,
restored in a fresh process (where the optimizer has not built its slots yet) and
trained `M` more; every array and learning rate after every step must equal an
uninterrupted run's bit for bit. Paths follow attributes, never Keras' per-process
unique names, so a model rebuilt in the same process matches its own checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - a KERAS_BACKEND choice
    pytest.skip("Keras runs on another backend", allow_module_level=True)

import looproto  # noqa: E402
from looproto.errors import CheckpointError  # noqa: E402
from looproto.module import variable_to_numpy, variables_by_path  # noqa: E402
from tests.backends import _zoo, _zoo_keras  # noqa: E402

CASES = {case.name: case for case in _zoo_keras.CASES}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both phases of every Keras case, each phase in one fresh process."""
    directory = tmp_path_factory.mktemp("keras_zoo")
    _zoo.spawn("keras", "first", directory)
    _zoo.spawn("keras", "resume", directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_in_a_fresh_process_matches_an_uninterrupted_run(zoo: Path, name: str) -> None:
    _zoo.compare(zoo, CASES[name])


def values(root: Any) -> dict[str, np.ndarray]:
    return {path: variable_to_numpy(v) for path, v in variables_by_path(root).items()}


def test_a_model_rebuilt_in_the_same_process_matches_its_own_checkpoint(tmp_path: Path) -> None:
    first = _zoo_keras.SequentialAdam()
    first.train(3)
    with looproto.CheckpointManager(tmp_path, first) as manager:
        manager.save(checkpoint_number=3)
    second = _zoo_keras.SequentialAdam()  # Keras names its layers `dense_2`, ... now.
    assert second.model.layers[0].name != first.model.layers[0].name
    assert not second.optimizer.built
    looproto.CheckpointManager(tmp_path, second).restore(3)
    assert second.optimizer.built
    expected, got = values(first), values(second)
    assert list(got) == list(expected)
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
    paths = list(expected)
    assert "model/layers/1/seed_generator/state" in paths  # Dropout's seed.
    assert {"loss_mean/total", "loss_mean/count", "optimizer/iterations"} <= set(paths)
    assert "optimizer/momentums/0" in paths and "optimizer/velocities/3" in paths
    assert not [p for p in paths if re.search(r"(dense|sequential|adam)(_\d+)?/", p)]
    built_for = looproto.checkpoint.read_metadata(tmp_path)["objects"]["optimizer/built_for"]
    assert built_for["state"]["variables"][0] == {"__looproto_variable__": "model/layers/0/kernel"}


def test_an_optimizer_whose_variables_the_tree_does_not_reach_is_refused(tmp_path: Path) -> None:
    model = keras.Sequential([keras.layers.Dense(2)])
    model.build((None, 3))
    holder = looproto.Module(name="holder")
    holder.optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    holder.optimizer.build(model.trainable_variables)  # The model is not in the tree.
    with pytest.raises(
        CheckpointError, match=r"'optimizer/built_for' refers to the variable .*kernel"
    ):
        with looproto.CheckpointManager(tmp_path, holder) as manager:
            manager.save(checkpoint_number=1)


def test_an_optimizer_built_for_other_variables_is_refused(tmp_path: Path) -> None:
    source = _zoo_keras.SequentialAdam()
    source.train(2)
    with looproto.CheckpointManager(tmp_path, source) as manager:
        manager.save(checkpoint_number=2)
    target = _zoo_keras.SequentialAdam()
    reversed_order = list(reversed(target.model.trainable_variables))
    target.optimizer.build(reversed_order)
    before = values(target)
    with pytest.raises(CheckpointError, match="built for other variables"):
        looproto.CheckpointManager(tmp_path, target).restore(2)
    for path, value in values(target).items():
        np.testing.assert_array_equal(value, before[path])


def test_tf_keras_optimizers_are_refused_not_dropped(tmp_path: Path) -> None:
    tf_keras = pytest.importorskip("tf_keras")
    holder = looproto.Module(name="holder")
    holder.optimizer = tf_keras.optimizers.Adam(0.01)
    with pytest.raises(CheckpointError, match=r"Cannot save 'optimizer': a `tf_keras`"):
        with looproto.CheckpointManager(tmp_path, holder) as manager:
            manager.save(checkpoint_number=1)


REFUSAL_PROGRAM = """
import tempfile
import keras
import looproto
holder = looproto.Module(name="holder")
holder.model = keras.Sequential([keras.layers.Dense(2)])
holder.model.build((None, 3))
holder.optimizer = keras.optimizers.Adam()
assert looproto.module.variables_by_path(holder) == {}  # Nothing it could save.
try:
    looproto.CheckpointManager(tempfile.mkdtemp(), holder).save(checkpoint_number=1)
except looproto.errors.CheckpointError as err:
    print(err)
"""


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_keras_on_other_backends_is_refused_not_dropped(keras_backend: str) -> None:
    pytest.importorskip(keras_backend)
    env = dict(os.environ, KERAS_BACKEND=keras_backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(_zoo.ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", REFUSAL_PROGRAM],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert f"Cannot save 'model': a Keras 3 object running on Keras' {keras_backend}" in (
        result.stdout.replace("JAX", "jax")
    )


OWNER_PROGRAM = """
from looproto.backends import tensorflow  # Imported first: the others register before it.
import keras
import looproto
from looproto import backends
from looproto.module import backend_for_variable
metric = keras.metrics.Mean()
print([b.name for b in backends.for_object(metric)][0], backend_for_variable(metric.total).name)
"""


def test_keras_objects_go_to_tensorflow_whatever_the_import_order() -> None:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(_zoo.ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", OWNER_PROGRAM],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert result.stdout.split() == ["tensorflow", "tensorflow"]
