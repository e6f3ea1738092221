"""The `looproto` command, run as a user runs it: in a subprocess, reading back what it wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from looproto.examples import mlp
from tests.helpers import scalars

CONFIGS = Path(mlp.__file__).parent / "configs"
FRAMEWORKS = {"numpy": "numpy", "jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def looproto_cmd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    environment.pop("LOOPROTO_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "looproto", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("backend", sorted(mlp.IMPLEMENTATIONS))
def test_train_then_evaluate_each_backend_from_configs_that_differ_in_one_line(
    tmp_path: Path, backend: str
) -> None:
    if importlib.util.find_spec(FRAMEWORKS[backend]) is None:
        pytest.skip(f"{backend} is not installed")
    config = CONFIGS / f"mlp_{backend}.toml"
    other = (CONFIGS / "mlp_numpy.toml").read_text().splitlines()
    differing = [
        (a, b) for a, b in zip(config.read_text().splitlines(), other, strict=True) if a != b
    ]
    assert all(a.startswith(("backend =", "model_dir =")) for a, _ in differing), differing

    result = looproto_cmd(
        "train", str(config), "--set", "train.steps=300", "--set", "train.eval_interval=200",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained to step 300" in result.stdout
    run = tmp_path / "runs" / f"mlp_{backend}"
    train = scalars(run / "summaries" / "train")
    assert [step for step, _ in train["loss"]] == [100, 200, 300]
    assert train["loss"][-1][1] < train["loss"][0][1]
    evals = scalars(run / "summaries" / "eval")
    assert [step for step, _ in evals["eval_loss"]] == [200, 300]
    assert sorted(os.listdir(run / "checkpoints")) == ["100", "300"]  # interval 500, + end

    inspect = looproto_cmd("inspect", str(run / "checkpoints"), "--json", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    meta = json.loads(inspect.stdout)
    assert meta["step"] == 300 and meta["steps"] == [100, 300]
    # Every backend's model starts from the same weights; torch's `Linear` keeps w transposed.
    if backend == "torch":
        assert meta["tree"]["model/layers/0/weight"]["shape"] == [32, 8]
    else:
        assert meta["tree"]["model/layers/0/w"]["shape"] == [8, 32]

    evaluate = looproto_cmd("evaluate", str(config), cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "evaluated at step 300: eval_loss" in evaluate.stdout


def test_continuous_evaluation_stops_after_its_timeout(tmp_path: Path) -> None:
    config = CONFIGS / "mlp_numpy.toml"
    looproto_cmd("train", str(config), "--set", "train.steps=100", cwd=tmp_path)
    result = looproto_cmd("evaluate", str(config), "--continuous", "--timeout", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluated at step 100" in result.stdout


def test_errors_are_one_line_with_exit_status_2_and_tracebacks_only_with_debug(
    tmp_path: Path,
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[trainer]\nfactory = "looproto.examples.mlp:trainer"\n[train]\nstep = 5\n')
    result = looproto_cmd("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"looproto: error: {config}: unknown key `train.step`; expected one of "
        "['check_finite', 'eval_interval', 'eval_steps', 'steps', 'steps_per_loop', "
        "'summary_interval']. "
        "Did you mean `train.steps`?"
    ]
    debug = looproto_cmd("--debug", "train", str(config), cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr

    missing = looproto_cmd("train", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    usage = looproto_cmd("trian", cwd=tmp_path)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    empty = looproto_cmd("inspect", str(tmp_path), cwd=tmp_path)
    assert empty.returncode == 2 and "No checkpoints in" in empty.stderr


def test_backends_lists_every_backend_with_its_version(tmp_path: Path) -> None:
    result = looproto_cmd("backends", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "usable" in lines["numpy"] and "(default)" in lines["numpy"]
    for name in ("jax", "tensorflow", "torch"):
        if name in lines and importlib.util.find_spec(FRAMEWORKS[name]) is not None:
            assert "usable" in lines[name], lines[name]


_PLUGIN = '''
"""A third-party backend: the NumPy backend under another name."""
from looproto.backends.numpy import NumpyBackend


class EchoBackend(NumpyBackend):
    name = "echo"


def make_backend():
    return EchoBackend()
'''


def test_backend_from_an_installed_third_party_package_is_found(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "echo_backend").mkdir(parents=True)
    (site / "echo_backend" / "__init__.py").write_text(_PLUGIN)
    dist = site / "echo_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[looproto.backends]\necho = echo_backend:make_backend\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listing = looproto_cmd("backends", cwd=tmp_path, env=env)
    assert any(
        line.startswith("echo ") and "usable" in line for line in listing.stdout.splitlines()
    )

    config = tmp_path / "echo.toml"
    config.write_text(
        (CONFIGS / "mlp_numpy.toml").read_text().replace('backend = "numpy"', 'backend = "echo"')
    )
    script = textwrap.dedent(
        f"""
        import looproto.examples.mlp as mlp
        mlp.IMPLEMENTATIONS["echo"] = mlp.IMPLEMENTATIONS["numpy"]
        from looproto.run import cli
        raise SystemExit(cli.main(["train", {str(config)!r}, "--set", "train.steps=100"]))
        """
    )
    environment = dict(os.environ, **env)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env=environment, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained to step 100" in result.stdout
