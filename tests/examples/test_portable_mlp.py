"""The portable MLP example as a user runs it: one config per backend, one implementation."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from looproto.errors import ConfigError
from looproto.examples import numpy_mlp, portable_mlp
from looproto.run import cli, config
from tests.helpers import scalars

CONFIGS = Path(portable_mlp.__file__).parent / "configs"
BACKENDS = ("numpy", "jax", "tensorflow", "torch")
TRAINING = [
    name
    for name in ("jax", "tensorflow", "torch")
    if importlib.util.find_spec(name) is not None
    and (name != "torch" or importlib.util.find_spec("array_api_compat") is not None)
]
needs_training_backend = pytest.mark.skipif(not TRAINING, reason="no framework backend installed")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch._dynamo.reset()  # Each trainer compiles its step; stay under the limit.


def test_configs_differ_only_in_the_backend_line() -> None:
    texts = {name: (CONFIGS / f"portable_{name}.toml").read_text() for name in BACKENDS}
    others = {
        name: [line for line in text.splitlines() if not line.startswith("backend = ")]
        for name, text in texts.items()
    }
    for name in BACKENDS:
        assert f'backend = "{name}"' in texts[name].splitlines()
        assert others[name] == others["numpy"], name
    for name in ("numpy", *TRAINING):  # Loading checks that the backend is installed.
        run = config.load(CONFIGS / f"portable_{name}.toml", environ={})
        assert run.backend == name
        assert run.trainer is not None
        assert run.trainer.factory == "looproto.examples.portable_mlp:trainer"
        assert run.model_dir == os.path.join("runs", "portable_mlp")  # shared by all four


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(list(argv))
    return status, out.getvalue()


@needs_training_backend
def test_train_on_one_backend_continue_on_another_evaluate_on_numpy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = TRAINING[0], TRAINING[-1]
    overrides = {
        "model_dir": repr(str(tmp_path)),
        "train.steps_per_loop": "50",
        "train.eval_interval": "100",
        "checkpoint.interval": "100",
        "backend_options.torch.backend": '"aot_eager"',  # Compiled, but quick to compile.
    }

    def run(command: str, backend: str, **more: str) -> tuple[int, str]:
        sets = [f"--set={key}={value}" for key, value in {**overrides, **more}.items()]
        extra = ["--no-progress"] if command == "train" else []
        return _cli(command, str(CONFIGS / f"portable_{backend}.toml"), *sets, *extra)

    status, out = run("train", first, **{"train.steps": "200"})
    assert status == 0
    assert "trained to step 200" in out
    # Another backend's config, the same model_dir: it resumes from step 200.
    status, out = run("train", second, **{"train.steps": "300"})
    assert status == 0
    assert "trained to step 300" in out
    trained_eval = out.split("eval: ")[1].strip()  # "eval_loss 0.04..., metrics/mae 0.1..."
    train = scalars(str(tmp_path / "summaries" / "train"))
    assert [step for step, _ in train["loss"]] == [50, 100, 150, 200, 250, 300]
    losses = [value for _, value in train["loss"]]
    assert losses[-1] < 0.5 * losses[0]
    evals = scalars(str(tmp_path / "summaries" / "eval"))
    assert [step for step, _ in evals["eval_loss"]] == [100, 200, 300]

    # The NumPy backend evaluates the newest checkpoint...
    status, out = run("evaluate", "numpy")
    assert status == 0
    assert f"evaluated at step 300: {trained_eval}" in out, out  # the same numbers
    # ... but cannot train: a one-line error, exit status 2, no new checkpoint.
    capsys.readouterr()
    status, _ = run("train", "numpy", **{"train.steps": "400"})
    assert status == cli.EXIT_USAGE
    assert "`numpy` backend cannot differentiate" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int)[-1] == "300"


@needs_training_backend
def test_module_runs_as_a_script(tmp_path: Path) -> None:
    backend = TRAINING[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "looproto.examples.portable_mlp", "--backend", backend,
         "--model-dir", str(tmp_path), "--steps", "200", "--eval-interval", "200",
         "--optimizer", "adam", "--quiet"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained steps 0 -> 200" in result.stdout
    assert "eval_loss" in result.stdout


def test_starts_from_the_numpy_examples_weights() -> None:
    model = portable_mlp.MLP(n_in=8)
    reference = numpy_mlp.MLP(n_in=8)
    for ours, theirs in zip(model.layers, reference.layers):
        np.testing.assert_array_equal(ours.w.numpy(), theirs.w.numpy())
        np.testing.assert_array_equal(ours.b.numpy(), theirs.b.numpy())


def test_numpy_backend_evaluates_like_the_numpy_example_but_cannot_train() -> None:
    trainer = portable_mlp.make_trainer("numpy")
    ours = portable_mlp.make_evaluator(trainer).evaluate(-1)
    reference = numpy_mlp.make_trainer()
    theirs = numpy_mlp.make_evaluator(reference).evaluate(-1)
    assert ours is not None and theirs is not None
    np.testing.assert_allclose(ours["eval_loss"], theirs["eval_loss"], rtol=1e-6)
    np.testing.assert_allclose(ours["metrics"]["mae"], theirs["metrics"]["mae"], rtol=1e-6)
    before = trainer.model.layers[0].w.numpy()
    with pytest.raises(ConfigError, match=r"cannot differentiate.*can still evaluate"):
        trainer.train(5)
    np.testing.assert_array_equal(trainer.model.layers[0].w.numpy(), before)
    assert int(trainer.global_step) == 0


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"`optimizer` must be one of \['sgd', 'adam'\]"):
        portable_mlp.make_trainer("numpy", optimizer="rmsprop")
    with pytest.raises(ConfigError, match="Unknown backend 'mxnet'"):
        portable_mlp.make_trainer("mxnet")
    with pytest.raises(ConfigError, match="`learning_rate` must be a positive number"):
        portable_mlp.make_trainer("numpy", learning_rate=0.0)
