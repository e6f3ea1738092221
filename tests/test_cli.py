"""The `looproto` command, run as a user runs it: in a subprocess, reading back what it wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from looproto.checkpoint import latest_step
from looproto.examples import mlp
from tests.helpers import checkpoint_contents, scalars

CONFIGS = Path(mlp.__file__).parent / "configs"
ROOT = Path(__file__).resolve().parent.parent
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


# ----------------------------------------------------------------------------
# Every fault is one line with its own exit status (see docs/reliability.md)

_BASE = """
backend = "numpy"
model_dir = "{model_dir}"
[trainer]
factory = "{factory}"
[train]
steps = 20
steps_per_loop = 10
"""


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Runs `looproto` in this process (fast; for faults found before anything runs)."""
    import logging

    from looproto.run import cli

    monkeypatch.chdir(ROOT)
    level = logging.getLogger("looproto").level
    yield cli.main
    logging.getLogger("looproto").setLevel(level)


def _config(
    tmp_path: Path, factory: str = "looproto.examples.mlp:trainer", extra: str = ""
) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(_BASE.format(model_dir=tmp_path / "run", factory=factory) + extra)
    return path


def _directory_config(tmp_path: Path) -> str:
    (tmp_path / "dir.toml").mkdir()
    return str(tmp_path / "dir.toml")


def _non_utf8_config(tmp_path: Path) -> str:
    (tmp_path / "latin1.toml").write_bytes('backend = "numpy"\n# caf\xe9\n'.encode("latin-1"))
    return str(tmp_path / "latin1.toml")


def _deep_config(tmp_path: Path) -> str:
    (tmp_path / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    return str(tmp_path / "deep.toml")


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (_directory_config, (), r"dir\.toml: is a directory; expected a TOML config file\.$"),
        (
            _non_utf8_config,
            (),
            r"latin1\.toml: not valid TOML: byte 23 is not UTF-8 text \(b'\\xe9'\)\.$",
        ),
        (_deep_config, (), r"deep\.toml: not a usable config: .* nested too deeply\.$"),
        (
            _config,
            ("--set", 'trainer.factory="../../etc:passwd"'),
            r"`trainer\.factory` must look like .* received '\.\./\.\./etc:passwd'\.$",
        ),
        (
            _config,
            ("--set", 'trainer.factory=".mlp:trainer"'),
            r"`trainer\.factory` must look like .* received '\.mlp:trainer'\.$",
        ),
        (
            _config,
            ("--set", 'trainer.learning_rate="fast"'),
            r"`trainer\.learning_rate` must be a number \(looproto\.examples\.mlp:trainer takes "
            r"`learning_rate: float`\); received 'fast'\.$",
        ),
        (
            _config,
            ("--set", 'trainer.factory="tests.run_factories:raises"'),
            r"`trainer\.factory` = tests\.run_factories:raises raised RuntimeError: the data "
            r"bucket is not reachable \(--debug shows the traceback\)\.$",
        ),
        (
            _config,
            ("--set", 'trainer.factory="tests.run_factories:returns_none"'),
            r"`trainer\.factory` = tests\.run_factories:returns_none returned None; expected a "
            r"trainer",
        ),
        (
            _config,
            ("--set", 'trainer.factory="tests.run_factories:no_train"'),
            r"`trainer\.factory` = tests\.run_factories:no_train returned .* of type _NoTrain; "
            r"expected a trainer \(an object with a `train\(num_steps\)` method",
        ),
        (_config, ("--set", "evaluate.timeout=nan"), r"`evaluate\.timeout` must be >= 0 seconds"),
    ],
)
def test_config_and_factory_faults_are_one_line_with_status_2(
    tmp_path: Path, in_process: Any, capsys: pytest.CaptureFixture[str], make: Any, args: Any,
    message: str,
) -> None:  # fmt: skip
    config = make(tmp_path)
    command = "evaluate" if "evaluate.timeout=nan" in args else "train"
    code = in_process([command, str(config), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"looproto: error: {config}: "), line
    assert re.search(message, line), line
    # Checked before anything was written (the model directory's check may have made
    # its empty directories).
    assert not [path for path in (tmp_path / "run").rglob("*") if not path.is_dir()]


def test_a_factory_that_cannot_read_its_data_is_one_line_with_status_4(
    tmp_path: Path, in_process: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "tests.run_factories:missing_data")
    code = in_process(["train", str(config)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 4
    assert line == (
        f"looproto: error: {config}: `trainer.factory` = tests.run_factories:missing_data "
        "raised FileNotFoundError: [Errno 2] No such file or directory: "
        "'/nonexistent/looproto/train.npz' (--debug shows the traceback)."
    )


@pytest.mark.parametrize("timeout", ["-5", "nan", "inf"])
def test_evaluate_timeout_argument_must_be_finite_and_not_negative(
    tmp_path: Path, in_process: Any, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    config = _config(tmp_path)
    code = in_process(["evaluate", str(config), "--continuous", "--timeout", timeout])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line.startswith("looproto: error: `--timeout` must be a number of seconds >= 0")
    assert line.endswith(f"received {float(timeout)}.")


@pytest.mark.parametrize(
    ("factory", "status", "message"),
    [
        # The error is found by the Controller, after orbax started its threads: they
        # are stopped before the process exits (no traceback after the line).
        (
            "float_step",
            2,
            "looproto: error: `global_step` must hold a scalar integer; received a variable "
            "of shape () and dtype float32.",
        ),
        (
            "text_step",
            2,
            "looproto: error: `_TextStep.train_step` returned text: 'done'; a train step "
            "returns None or arrays (return outputs from `train_loop_end`).",
        ),
    ],
)
def test_runner_faults_are_one_line_with_no_thread_noise_after_it(
    tmp_path: Path, factory: str, status: int, message: str
) -> None:
    config = _config(tmp_path, f"tests.run_factories:{factory}")
    for _ in range(2):  # the orbax noise came in most runs, not all
        result = looproto_cmd("train", str(config), "--no-progress", cwd=ROOT)
        assert result.returncode == status, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Exception" not in result.stderr
        assert result.stderr.rstrip().splitlines()[-1] == message, result.stderr[-3000:]
        assert not any(
            name.isdigit() for name in os.listdir(tmp_path / "run" / "checkpoints")
        )  # no checkpoint of a bad run
        assert not (tmp_path / "run" / "checkpoints" / ".looproto-lock").exists()


def test_train_steps_minus_one_with_an_evaluator_trains_until_the_data_ends(
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path,
        "tests.run_factories:finite_data",
        '[evaluator]\nfactory = "tests.run_factories:same"\n',
    )
    result = looproto_cmd(
        "train", str(config), "--no-progress", "--set", "train.steps=-1",
        "--set", "train.eval_interval=30", "--set", "train.eval_steps=2", cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained to step 100" in result.stdout  # 100 batches, one epoch
    evals = scalars(tmp_path / "run" / "summaries" / "eval")
    assert [step for step, _ in evals["eval_loss"]] == [30, 60, 90, 100]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["100"]


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_a_signal_during_start_up_stops_before_training_with_one_line(
    tmp_path: Path, backend: str
) -> None:
    if importlib.util.find_spec(FRAMEWORKS[backend]) is None:
        pytest.skip(f"{backend} is not installed")
    config = _config(tmp_path, "tests.run_factories:slow_start")
    config.write_text(config.read_text().replace('"numpy"', f'"{backend}"'))
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    environment.pop("LOOPROTO_BACKEND", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "looproto", "train", str(config), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "factory: building"  # start-up is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "looproto: stopped by SIGINT during start-up, before training; nothing was "
        "written. Run again to train."
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "train |" not in err and out == ""  # not swallowed: nothing trained
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit()]


@pytest.mark.parametrize("backend", sorted(mlp.IMPLEMENTATIONS))
def test_a_diverging_run_exits_5_naming_the_step_and_saves_nothing_non_finite(
    tmp_path: Path, backend: str
) -> None:
    if importlib.util.find_spec(FRAMEWORKS[backend]) is None:
        pytest.skip(f"{backend} is not installed")
    config = CONFIGS / f"mlp_{backend}.toml"
    run = tmp_path / "runs" / f"mlp_{backend}"
    # A learning rate that makes the MLP blow up within a few loops; a checkpoint a loop.
    result = looproto_cmd(
        "train", str(config), "--no-progress", "--set", "train.steps=100",
        "--set", "train.steps_per_loop=10", "--set", "checkpoint.interval=10",
        "--set", "trainer.learning_rate=100.0", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"looproto: error: Training diverged: train output 'loss' is (nan|inf|-inf) after "
        r"steps (\d+)-(\d+) \(global step \3\)\. Stopped before writing its summaries or a "
        r"checkpoint; (.*)\.",
        line,
    )
    assert found is not None, line
    step = int(found[3])
    newest = latest_step(run / "checkpoints")
    if newest is None:
        assert found[4] == "no checkpoint was saved"
    else:
        assert newest < step
        assert (
            found[4]
            == f"the newest checkpoint, {run.resolve() / 'checkpoints' / str(newest)}, is kept"
        )
        arrays, _ = checkpoint_contents(run / "checkpoints")
        assert all(np.isfinite(array).all() for array in arrays.values())


def test_a_run_that_diverges_on_resume_keeps_its_good_checkpoint(tmp_path: Path) -> None:
    config = CONFIGS / "mlp_numpy.toml"
    run = tmp_path / "runs" / "mlp_numpy"
    sets = ["--no-progress", "--set", "train.steps_per_loop=10", "--set", "checkpoint.interval=20"]
    good = looproto_cmd("train", str(config), *sets, "--set", "train.steps=20", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    before = looproto_cmd("inspect", str(run / "checkpoints"), "--json", cwd=tmp_path).stdout
    diverged = looproto_cmd(
        "train", str(config), *sets, "--set", "train.steps=60",
        "--set", "trainer.learning_rate=100.0", cwd=tmp_path,
    )  # fmt: skip
    assert diverged.returncode == 5, diverged.stderr[-3000:]
    assert diverged.stderr.strip().splitlines()[-1] == (
        "looproto: error: Training diverged: train output 'loss' is nan after steps 21-30 "
        "(global step 30). Stopped before writing its summaries or a checkpoint; the newest "
        f"checkpoint, {run.resolve() / 'checkpoints' / '20'}, is kept."
    )
    after = looproto_cmd("inspect", str(run / "checkpoints"), "--json", cwd=tmp_path).stdout
    assert json.loads(after) == json.loads(before)  # nothing was saved over it


def test_ctrl_c_while_evaluate_waits_is_one_line_with_status_130(tmp_path: Path) -> None:
    config = _config(tmp_path, extra='[evaluator]\nfactory = "looproto.examples.mlp:evaluator"\n')
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    environment.pop("LOOPROTO_BACKEND", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "looproto", "evaluate", str(config), "--continuous"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("restoring or initializing model")
    time.sleep(0.5)  # waiting for a first checkpoint that never comes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "looproto: interrupted"
    assert "Traceback" not in err
    assert os.listdir(tmp_path / "run") == ["summaries"]  # a reader: no checkpoint dir made


def test_orbax_thread_tracebacks_stay_out_of_the_one_line_report_unless_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # orbax logs an exception in the thread that raised it, then the waiting thread
    # re-raises it (and looproto prints it as one line): the first is dropped.
    import logging
    import threading

    from looproto.run.faults import quiet_background_tracebacks

    absl = logging.getLogger("absl")

    def fail_in_a_thread() -> None:
        def target() -> None:
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                absl.exception("_SignalingThread.run() raised an exception")

        worker = threading.Thread(target=target)
        worker.start()
        worker.join()

    try:
        with caplog.at_level(logging.ERROR, logger="absl"):
            quiet_background_tracebacks(debug=False)
            fail_in_a_thread()
            absl.error("an error of the main thread still shows")
            assert [r.getMessage() for r in caplog.records] == [
                "an error of the main thread still shows"
            ]
            quiet_background_tracebacks(debug=True)
            fail_in_a_thread()
            assert caplog.records[-1].exc_info is not None  # --debug keeps it
    finally:
        quiet_background_tracebacks(debug=True)
