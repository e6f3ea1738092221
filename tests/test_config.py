"""Run configs: what a valid file gives, and the one-line error for each kind of mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from looproto import backends
from looproto.errors import BackendNotAvailableError, ConfigError
from looproto.run import config

FULL = """
backend = "numpy"
model_dir = "runs/x"
seed = 3

[trainer]
factory = "looproto.examples.mlp:trainer"
batch_size = 32

[evaluator]
factory = "looproto.examples.mlp:evaluator"

[train]
steps = 200
steps_per_loop = 50
summary_interval = 100
eval_interval = 100

[evaluate]
steps = 4
timeout = 1.5

[checkpoint]
interval = 100
max_to_keep = 2
async_save = true

[backend_options.jax]
data = "device"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_config_is_read_into_typed_sections(tmp_path: Path) -> None:
    run = config.load(write(tmp_path, FULL), environ={})
    assert run.backend == "numpy"
    assert run.seed == 3
    assert run.trainer == config.FactoryConfig("looproto.examples.mlp:trainer", {"batch_size": 32})
    assert run.train == config.TrainConfig(
        steps=200, steps_per_loop=50, summary_interval=100, eval_interval=100
    )
    assert run.evaluate == config.EvaluateConfig(steps=4, timeout=1.5)
    assert run.checkpoint == config.CheckpointConfig(interval=100, max_to_keep=2, async_save=True)
    assert run.checkpoint_dir == "runs/x/checkpoints"
    assert run.active_backend_options() == {}  # jax options, numpy backend
    assert run.backend_options == {"jax": {"data": "device"}}


def test_overrides_and_environment_take_precedence_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    run = config.load(path, ["train.steps=1000", "backend=numpy", "trainer.batch_size=8"], {})
    assert run.train is not None and run.train.steps == 1000
    assert run.trainer is not None and run.trainer.kwargs == {"batch_size": 8}
    env = {"LOOPROTO_BACKEND": "jax"}
    pytest.importorskip("jax")
    assert config.load(path, environ=env).backend == "jax"
    assert config.load(path, ["backend=numpy"], env).backend == "numpy"  # --set wins


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nstep = 10\n", r"unknown key `train\.step`.*Did you mean `train\.steps`\?"),
        ("[trian]\nsteps = 10\n", r"unknown key `trian`.*Did you mean `train`\?"),
        ('[train]\nsteps = "ten"\n', r"`train\.steps` must be an integer; received 'ten'"),
        ("[train]\nsteps = true\n", r"`train\.steps` must be an integer; received True"),
        ("[train]\nsteps_per_loop = 5\n", r"`train\.steps` is required"),
        ("[train]\nsteps = 0\n", r"`train\.steps` must be a positive integer or -1"),
        (
            "[train]\nsteps = 10\nsteps_per_loop = 4\nsummary_interval = 6\n",
            r"`train\.summary_interval` \(6\) must be a multiple of `train\.steps_per_loop` \(4\)",
        ),
        ("[train]\nsteps = 10\neval_interval = 5\n", r"`train\.eval_interval` is set but"),
        ('backend = "nope"\n', r"`backend`: unknown backend 'nope'; expected one of"),
        ("seed = 1.5\n", r"`seed` must be an integer; received 1.5"),
        ("[trainer]\nbatch_size = 3\n", r"`trainer\.factory` is missing"),
        ('[trainer]\nfactory = "no_colon"\n', r"must look like \"package\.module:function\""),
        ("[backend_options.jaxx]\ndata = 1\n", r"Did you mean `backend_options\.jax`\?"),
        ("[checkpoint]\nmax_to_keep = 0\n", r"`checkpoint\.max_to_keep` must be a positive"),
        ("[evaluate]\ntimeout = -1\n", r"`evaluate\.timeout` must be >= 0"),
        ("this is not toml", r"not valid TOML"),
    ],
)
def test_each_mistake_is_one_config_error_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(path, environ={})
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"expected `--set key=value`"):
        config.load(write(tmp_path, FULL), ["train.steps"], {})
    with pytest.raises(ConfigError, match=r"`seed` is not a table"):
        config.load(write(tmp_path, FULL), ["seed.x=1"], {})


def test_uninstalled_backend_names_the_extra(tmp_path: Path, monkeypatch: Any) -> None:
    def missing() -> Any:
        raise BackendNotAvailableError(
            "The `fancy` backend needs a framework that is not installed. Install it with: "
            "pip install 'looproto[fancy]'"
        )

    monkeypatch.setattr(backends, "_entries", dict(backends._entries))
    backends.register("fancy", missing)
    with pytest.raises(ConfigError, match=r"backend = 'fancy'.*pip install 'looproto\[fancy\]'"):
        config.load(write(tmp_path, 'backend = "fancy"\n'), environ={})


def _factory_config(tmp_path: Path, table: str) -> config.RunConfig:
    return config.load(write(tmp_path, f'backend = "numpy"\n[trainer]\n{table}\n'), environ={})


def test_factory_errors_name_the_key_and_suggest(tmp_path: Path) -> None:
    run = _factory_config(tmp_path, 'factory = "no.such.module:f"')
    assert run.trainer is not None
    with pytest.raises(ConfigError, match=r"`trainer\.factory` = 'no\.such\.module:f': module"):
        config.call_factory(run.trainer, run, "trainer")
    run = _factory_config(tmp_path, 'factory = "looproto.examples.mlp:trainr"')
    assert run.trainer is not None
    with pytest.raises(ConfigError, match=r"no attribute 'trainr'.*Did you mean .*:trainer`\?"):
        config.call_factory(run.trainer, run, "trainer")
    run = _factory_config(tmp_path, 'factory = "looproto.examples.mlp:trainer"\nbatch_sise = 2')
    assert run.trainer is not None
    with pytest.raises(
        ConfigError, match=r"unknown key `trainer\.batch_sise`.*`trainer\.batch_size`"
    ):
        config.call_factory(run.trainer, run, "trainer")
    run = _factory_config(tmp_path, 'factory = "looproto.examples.mlp:trainer"\nseed = 2')
    assert run.trainer is not None
    with pytest.raises(ConfigError, match=r"`trainer\.seed` is set by looproto"):
        config.call_factory(run.trainer, run, "trainer")


def test_factory_gets_its_keys_and_the_injected_values_it_names(tmp_path: Path) -> None:
    run = config.load(write(tmp_path, FULL), ["seed=5"], {})
    assert run.trainer is not None
    trainer = config.call_factory(run.trainer, run, "trainer")
    assert trainer._train_dataset.batch_size == 32
    assert trainer._train_dataset.seed == 5
