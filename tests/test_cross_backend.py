"""One model on every framework, checkpoints that cross backends (the portable MLP).

The portable MLP (`looproto.examples.portable_mlp`) is one implementation; each test
runs it on every installed training backend (JAX, PyTorch, TensorFlow) from the same
initial values and data, in each backend's compiled inner loop, and checks:

* training agrees across backends, and with `numpy_mlp`'s hand-written backprop;
* a checkpoint written on backend A restores on backend B (every ordered pair, and
  NumPy for evaluation), and B's continued run matches a run that stayed on A;
* `looproto inspect` shows the same tree whatever wrote the checkpoint;
* a checkpoint whose tree does not match is refused with every differing path listed
  (shapes and dtypes), and nothing is restored; so is one whose data pipeline cannot
  cross (a `tf.data` position into an `ArrayDataset`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import portable
from looproto.checkpoint import CheckpointManager, read_metadata
from looproto.data import ArrayDataset
from looproto.errors import CheckpointError, ConfigError
from looproto.examples import numpy_mlp, portable_mlp
from looproto.module import variable_to_numpy, variables_by_path
from looproto.run import cli


def _installed(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    # torch tensors get their array API namespace from array-api-compat.
    return name != "torch" or importlib.util.find_spec("array_api_compat") is not None


TRAINING = [name for name in ("jax", "tensorflow", "torch") if _installed(name)]
if not TRAINING:
    pytest.skip("no framework backend installed", allow_module_level=True)

# torch: compiled (Dynamo + AOTAutograd, one graph with the backward) but quick to compile.
OPTIONS: dict[str, dict[str, Any]] = {
    "jax": {},
    "tensorflow": {},
    "torch": {"backend": "aot_eager", "trace_autograd": True},
    "numpy": {},
}
STEPS_PER_LOOP = 10
FIRST, TOTAL = 30, 60  # checkpoint at FIRST, continue to TOTAL


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    # Every trainer compiles its own step: without a reset the compiled-code cache
    # would reach torch's recompile limit and silently run eagerly.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch._dynamo.reset()


def state(trainer: Any) -> dict[str, np.ndarray]:
    return {path: variable_to_numpy(v) for path, v in variables_by_path(trainer).items()}


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str) -> None:
    assert list(got) == list(expected), where
    for path, value in expected.items():
        assert got[path].dtype == value.dtype, f"{where}: {path}"
        if value.dtype.kind in "iub":
            np.testing.assert_array_equal(got[path], value, err_msg=f"{where}: {path}")
        else:
            np.testing.assert_allclose(
                got[path], value, rtol=1e-4, atol=2e-6, err_msg=f"{where}: {path}"
            )


def controller(model_dir: Path, backend: str, **kwargs: Any) -> tuple[Any, Any]:
    return portable_mlp.make_controller(
        str(model_dir),
        backend=backend,
        steps_per_loop=STEPS_PER_LOOP,
        checkpoint_interval=FIRST,
        backend_options=OPTIONS[backend],
        **kwargs,
    )


# ----------------------------------------------------------------------------
# The same code, the same numbers


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_agrees_across_backends_from_the_same_start(optimizer: str) -> None:
    finals = {}
    for backend in TRAINING:
        trainer = portable_mlp.make_trainer(
            backend, optimizer=optimizer, backend_options=OPTIONS[backend]
        )
        losses = [float(trainer.train(STEPS_PER_LOOP)["loss"]) for _ in range(6)]
        assert losses[-1] < 0.5 * losses[0], (backend, losses)
        finals[backend] = state(trainer)
        assert int(trainer.global_step) == 60
    first = TRAINING[0]
    for backend in TRAINING[1:]:
        assert_close(finals[backend], finals[first], f"{backend} vs {first}")
    if optimizer == "sgd":
        # ... and with the hand-written backprop and SGD of the NumPy example.
        reference = numpy_mlp.make_trainer()
        for _ in range(6):
            reference.train(STEPS_PER_LOOP)
        expected = state(reference)
        for backend in TRAINING:
            got = finals[backend]
            for i, name in itertools.product(range(3), ("w", "b")):
                np.testing.assert_allclose(
                    got[f"model/layers/{i}/{name}"],
                    expected[f"model/layers/{i}/{name}"],
                    rtol=1e-4,
                    atol=2e-6,
                    err_msg=backend,
                )
                velocity = expected[f"velocity/{i}/{'wb'.index(name)}"]
                np.testing.assert_allclose(
                    got[f"optimizer/velocity/layers/{i}/{name}"], velocity, rtol=1e-4, atol=2e-6
                )


def test_each_backend_runs_its_compiled_inner_loop() -> None:
    for backend in TRAINING:
        if backend == "torch":
            from torch._dynamo.utils import counters

            counters.clear()
        trainer = portable_mlp.make_trainer(backend, backend_options=OPTIONS[backend])
        trainer.train(5)
        trainer.train(5)
        loop = trainer._train_loop_fn
        if backend == "jax":
            from looproto.backends.jax._loop import JaxLoop

            assert isinstance(loop, JaxLoop) and loop._scan
        elif backend == "tensorflow":
            from looproto.backends import tensorflow as tf_backend

            assert isinstance(loop, tf_backend.TensorflowLoop)
            assert loop.trace_count == 1 and len(loop._stacked_calls) == 1
        else:
            assert loop._compile_step
            # One graph, the backward traced in; no recompile for the second loop.
            assert counters["stats"]["unique_graphs"] == 1
            assert not counters["graph_break"]


# ----------------------------------------------------------------------------
# Checkpoints across backends


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per training backend: a checkpoint at FIRST, its evaluation, and the run to TOTAL."""
    out: dict[str, dict[str, Any]] = {}
    for backend in TRAINING:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch._dynamo.reset()
        root = tmp_path_factory.mktemp(f"run_{backend}")
        ctrl, trainer = controller(root, backend)
        with ctrl:
            ctrl.train(steps=FIRST)
            evaluation = ctrl.evaluate(-1)
            snapshot = root.parent / f"checkpoints_{backend}"
            shutil.copytree(root / "checkpoints", snapshot)
            ctrl.train(steps=TOTAL)
        out[backend] = {
            "checkpoints": snapshot,
            "eval": evaluation,
            "final": state(trainer),
            "iterator": trainer._train_iter.get_state(),
        }
    return out


PAIRS = [(a, b) for a in TRAINING for b in [*TRAINING, "numpy"]]


@pytest.mark.parametrize(("writer", "reader"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_checkpoint_restores_and_training_continues_on_another_backend(
    runs: dict[str, dict[str, Any]], writer: str, reader: str, tmp_path: Path
) -> None:
    shutil.copytree(runs[writer]["checkpoints"], tmp_path / "checkpoints")
    ctrl, trainer = controller(tmp_path, reader)  # restores the newest checkpoint
    with ctrl:
        assert int(trainer.global_step) == FIRST
        evaluation = ctrl.evaluate(-1)
        expected = runs[writer]["eval"]
        assert evaluation is not None
        np.testing.assert_allclose(evaluation["eval_loss"], expected["eval_loss"], rtol=1e-5)
        np.testing.assert_allclose(
            evaluation["metrics"]["mae"], expected["metrics"]["mae"], rtol=1e-5
        )
        if reader == "numpy":
            with pytest.raises(ConfigError, match="`numpy` backend cannot differentiate"):
                ctrl.train(steps=TOTAL)
            assert int(trainer.global_step) == FIRST  # nothing ran
            return
        ctrl.train(steps=TOTAL)
    assert_close(state(trainer), runs[writer]["final"], f"{writer}->{reader}")
    assert trainer._train_iter.get_state() == runs[writer]["iterator"]


def _inspect(directory: Path) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", str(directory)]) == 0
    return out.getvalue().splitlines()[1:]  # without the directory line


def test_inspect_shows_the_same_tree_whatever_wrote_it(runs: dict[str, dict[str, Any]]) -> None:
    trees = {}
    listings = {}
    for backend in TRAINING:
        meta = read_metadata(runs[backend]["checkpoints"])
        assert meta["step"] == FIRST
        trees[backend] = {p: (s["shape"], s["dtype"]) for p, s in meta["tree"].items()}
        assert meta["objects"]["_train_iter"]["state"] == {"epoch": 0, "batch": FIRST}
        listings[backend] = _inspect(runs[backend]["checkpoints"])
    first = TRAINING[0]
    for backend in TRAINING[1:]:
        assert trees[backend] == trees[first], backend
        assert listings[backend] == listings[first], backend
    tree = trees[first]
    # int64 counters stay int64 on every backend (JAX runs them in int32 without x64).
    assert tree["global_step"] == ([], "int64")
    assert tree["loss_count"] == ([], "int64")
    assert tree["model/layers/0/w"] == ([8, 32], "float32")
    assert tree["optimizer/velocity/layers/2/b"] == ([1], "float32")
    # The same tree as a NumPy-backend trainer's live variables: what any backend restores into.
    live = portable_mlp.make_trainer("numpy")
    assert tree == {
        path: (list(v.shape), str(v.dtype)) for path, v in variables_by_path(live).items()
    }


class _SmallMLPTrainer(portable_mlp.MLPTrainer):
    """The trainer with a 16-unit model and Adam: reshaped, missing and extra variables."""

    def __init__(self, backend: str) -> None:
        model = portable_mlp.MLP(n_in=8, hidden=16)
        data = numpy_mlp.make_data(256)
        options = looproto.StandardTrainerOptions(backend=backend)
        dataset = ArrayDataset(data, 64, shuffle=True, epochs=None)
        super().__init__(model, dataset, portable.Adam(model), options)


@pytest.mark.parametrize("reader", [*TRAINING, "numpy"])
def test_mismatched_tree_lists_every_differing_path_and_restores_nothing(
    runs: dict[str, dict[str, Any]], reader: str
) -> None:
    writer = TRAINING[-1]
    live = _SmallMLPTrainer(reader)
    before = state(live)
    with CheckpointManager(runs[writer]["checkpoints"], live) as manager:
        with pytest.raises(CheckpointError) as info:
            manager.restore_or_initialize()
    message = str(info.value)
    assert "nothing was restored" in message
    for line in (
        "'model/layers/0/w': checkpoint shape=(8, 32) dtype=float32, live shape=(8, 16) "
        "dtype=float32",
        "'model/layers/2/w': checkpoint shape=(32, 1) dtype=float32, live shape=(16, 1) "
        "dtype=float32",
        "'optimizer/iterations': not in the checkpoint (live shape=() dtype=int64)",
        "'optimizer/m/layers/1/b': not in the checkpoint (live shape=(16,) dtype=float32)",
        "'optimizer/velocity/layers/0/w': in the checkpoint (shape=(8, 32) dtype=float32) but "
        "not a live variable",
    ):
        assert line in message
    assert_close(state(live), before, "untouched")


# ----------------------------------------------------------------------------
# What cannot cross, and what can: native models' weights


@pytest.mark.skipif("tensorflow" not in TRAINING, reason="needs TensorFlow")
def test_a_tf_data_position_does_not_restore_into_an_array_dataset(tmp_path: Path) -> None:
    from looproto.examples import tensorflow_mlp

    written = tensorflow_mlp.make_trainer()  # tf.Variables and a tf.data pipeline
    written.train(5)
    with CheckpointManager(tmp_path, written) as manager:
        manager.save(5)
    live = numpy_mlp.make_trainer()  # the same variable tree, an ArrayDataset
    before = state(live)
    with CheckpointManager(tmp_path, live) as manager:
        with pytest.raises(CheckpointError, match=r"writing '_train_iter' failed") as info:
            manager.restore(5)
    assert "Nothing was restored" in str(info.value)
    assert_close(state(live), before, "untouched")
    assert live._train_iter.get_state() == {"epoch": 0, "batch": 0}


@pytest.mark.parametrize("native", [b for b in ("jax", "tensorflow") if b in TRAINING])
def test_native_models_weights_restore_into_the_portable_model_and_back(
    native: str, tmp_path: Path
) -> None:
    # The JAX and TensorFlow examples hold the same tree (`layers/<i>/{w,b}`) in
    # `looproto.Variable`s of `jax.Array`s and in `tf.Variable`s respectively.
    module = {"jax": "looproto.examples.jax_mlp", "tensorflow": "looproto.examples.tensorflow_mlp"}
    example = importlib.import_module(module[native])
    trained = example.make_trainer()
    trained.train(20)
    with CheckpointManager(tmp_path / "native", trained.model) as manager:
        manager.save(20)
    model = portable_mlp.MLP(n_in=8, seed=1)  # other initial weights
    with CheckpointManager(tmp_path / "native", model) as manager:
        manager.restore(20)
    x = numpy_mlp.make_data(64, seed=3)["x"]
    expected = np.asarray(trained.model(x))
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)  # NumPy forward

    # ... and back: the portable model's NumPy weights into the native variables.
    model.layers[0].b.assign(np.full(32, 0.25, np.float32))
    with CheckpointManager(tmp_path / "portable", model) as manager:
        manager.save(1)
    fresh = example.make_trainer()
    with CheckpointManager(tmp_path / "portable", fresh.model) as manager:
        manager.restore(1)
    np.testing.assert_array_equal(variable_to_numpy(fresh.model.layers[0].b), np.full(32, 0.25))
