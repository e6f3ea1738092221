"""`looproto.distributed` without a framework: environments, control messages, the launcher.

A scripted `FakeEngine` stands in for the other process: it answers each control message
as the peer would, so the multi-process paths of checkpoints, summaries and the
Controller run here in one process. The real engines run in `test_multiprocess.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import distributed
from looproto.checkpoint import CheckpointManager, latest_step
from looproto.data import ArrayDataset
from looproto.errors import CheckpointError, ConfigError, DistributedError
from looproto.run import cli, config, launch
from looproto.testing import read_events

Peer = Callable[[str, Any], Any]


class FakeEngine:
    """One process's view of a run whose other processes answer as `peer(what, value)` says.

    `peer` gets what this process published (`what`, `value`) and returns what the other
    processes publish at the same point; it may raise to play a dead peer, or return
    `OutOfStep(what)` to play a peer somewhere else in the run.
    """

    backend = "fake"

    def __init__(
        self, index: int = 0, count: int = 2, peer: Peer | None = None, *, collective: bool = False
    ) -> None:
        self.process_index = index
        self.process_count = count
        self.timeout = 7.0
        self.collective_checkpoints = collective
        self.peer = peer or (lambda what, value: value)
        self.store: dict[str, str] = {}
        self.seen: list[str] = []

    def key_value_set(self, key: str, value: str) -> None:
        self.store[key] = value

    def key_value_get(self, key: str, timeout: float) -> str:
        round_ = key.split("/")[2]
        mine = json.loads(self.store[f"looproto/gather/{round_}/{self.process_index}"])
        self.seen.append(mine["what"])
        answer = self.peer(mine["what"], mine["value"])
        if isinstance(answer, OutOfStep):
            return json.dumps({"what": answer.what, "value": None})
        return json.dumps({"what": mine["what"], "value": answer})

    def key_value_delete(self, key: str) -> None:
        self.store.pop(key, None)

    def scope(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def shutdown(self) -> None:
        pass


class OutOfStep:
    def __init__(self, what: str) -> None:
        self.what = what


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeEngine]:
    """Installs a `FakeEngine` as the active engine: `engine(index=1, peer=...)`."""

    def install(**kwargs: Any) -> FakeEngine:
        fake = FakeEngine(**kwargs)
        assert isinstance(fake, distributed.Engine)
        monkeypatch.setattr(distributed, "_engine", fake)
        return fake

    return install


# ----------------------------------------------------------------------------
# One process: everything is a no-op


def test_without_an_engine_the_run_is_one_process() -> None:
    assert distributed.engine() is None
    assert (distributed.process_index(), distributed.process_count()) == (0, 1)
    assert distributed.is_chief() and distributed.shard() == (0, 1)
    assert distributed.all_gather({"a": 1}, "x") == [{"a": 1}]
    distributed.barrier("x")
    distributed.check_same({"step": 3}, "the step")


def test_a_backend_without_an_engine_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'numpy' backend has no distributed engine.*'jax'"):
        distributed.initialize("numpy")
    with pytest.raises(ConfigError, match=r"`timeout` must be a positive number.*timeout=0"):
        distributed.initialize("numpy", timeout=0)


# ----------------------------------------------------------------------------
# Environments


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_worker_environment_is_what_each_engine_reads_back(backend: str) -> None:
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    for index in range(3):
        env = launch.worker_environment(backend, index, 3, ports, "127.0.0.1")
        found = distributed.environment(backend, env)
        assert found is not None
        assert (found.process_index, found.process_count) == (index, 3)
        assert found.coordinator == f"127.0.0.1:{ports[0]}"
        # No other engine mistakes it for its own launch.
        for other in {"torch", "jax", "tensorflow"} - {backend}:
            assert distributed.environment(other, env) is None


def test_torch_environment_is_torchruns() -> None:
    env = launch.worker_environment("pytorch", 1, 2, [29500], "10.0.0.1")
    assert env["RANK"] == env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "10.0.0.1"
    assert env["MASTER_PORT"] == "29500"


def test_tf_config_numbers_the_chief_first() -> None:
    cluster = {"chief": ["c:1"], "worker": ["w:1", "w:2"]}
    as_worker = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    found = distributed.environment("tf", {"TF_CONFIG": as_worker})
    assert found is not None
    assert (found.process_index, found.process_count, found.coordinator) == (2, 3, "c:1")
    as_chief = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    chief = distributed.environment("tensorflow", {"TF_CONFIG": as_chief})
    assert chief is not None and chief.process_index == 0


@pytest.mark.parametrize(
    ("backend", "environ", "match"),
    [
        ("torch", {"WORLD_SIZE": "two", "RANK": "0"}, r"`WORLD_SIZE` must be an integer.*'two'"),
        ("torch", {"WORLD_SIZE": "2", "RANK": "2"}, r"0 <= index < count.*index=2, count=2"),
        ("jax", {"LOOPROTO_NUM_PROCESSES": "2", "LOOPROTO_PROCESS_ID": "0"}, r"COORDINATOR"),
        ("tensorflow", {"TF_CONFIG": "{not json"}, r"`TF_CONFIG` must be JSON"),
        (
            "tensorflow",
            {"TF_CONFIG": '{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}'},
            r"task type 'ps'",
        ),
    ],
)
def test_malformed_environments_are_config_errors(
    backend: str, environ: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        distributed.environment(backend, environ)


def test_worker_environment_needs_its_ports() -> None:
    with pytest.raises(ConfigError, match=r"tensorflow launch of 2 processes needs 2 port"):
        launch.worker_environment("tensorflow", 0, 2, [1234], "127.0.0.1")
    with pytest.raises(ConfigError, match=r"'numpy' backend has no distributed engine"):
        launch.worker_environment("numpy", 0, 2, [1234], "127.0.0.1")


# ----------------------------------------------------------------------------
# Control messages


def test_check_same_lists_every_difference_by_process(engine: Callable[..., FakeEngine]) -> None:
    engine(peer=lambda what, value: {**value, "b": 9})
    with pytest.raises(DistributedError) as info:
        distributed.check_same({"a": 1, "b": 2}, "the things", hint="Fix it.")
    message = str(info.value)
    assert "disagree on the things (1 difference(s))" in message
    assert "'b': process 0: 2, process 1: 9" in message
    assert "'a'" not in message
    assert message.endswith("Fix it.")


def test_out_of_step_processes_are_reported(engine: Callable[..., FakeEngine]) -> None:
    engine(index=1, peer=lambda what, value: OutOfStep("the end of `train()`"))
    with pytest.raises(DistributedError, match=r"Process 1 of 2 is at a save, but process 0 is "
                       r"at the end of `train\(\)`: the processes are out of step"):  # fmt: skip
        distributed.barrier("a save")


def test_a_silent_peer_is_a_distributed_error_naming_the_wait(
    engine: Callable[..., FakeEngine],
) -> None:
    def dead(what: str, value: Any) -> Any:
        raise TimeoutError("Wait timeout after 7000 ms\nmore text")

    engine(peer=dead)
    with pytest.raises(DistributedError) as info:
        distributed.all_gather(1, "checkpoint 10")
    message = str(info.value)
    assert message.startswith("Process 0 of 2: waiting for process 1 at checkpoint 10 failed")
    assert "has died or stopped responding (the run's timeout is 7 s" in message
    assert message.endswith("Cause: TimeoutError: Wait timeout after 7000 ms")


def test_gathers_clean_up_the_previous_round(engine: Callable[..., FakeEngine]) -> None:
    fake = engine()
    for i in range(4):
        assert distributed.all_gather(i, "round") == [i, i]
    assert len(fake.store) == 1  # Only the last round's key is left.


# ----------------------------------------------------------------------------
# What looproto does with it: summaries, checkpoints, the global step


def test_only_the_chief_writes_summaries(tmp_path: Path, engine: Callable[..., FakeEngine]) -> None:
    engine(index=1)
    worker = looproto.SummaryManager(tmp_path / "worker", global_step=looproto.create_global_step())
    worker.write_summaries({"loss": 1.0})
    worker.close()
    assert not worker.enabled and not (tmp_path / "worker").exists()
    everyone = looproto.SummaryManager(tmp_path / "all", all_processes=True)
    everyone.write_summaries({"loss": 1.0}, step=1)
    everyone.close()
    assert read_events(tmp_path / "all") == {".": {"loss": [(1, 1.0)]}}


def _state() -> dict[str, Any]:
    return {
        "w": looproto.Variable(np.arange(3, dtype=np.float32), name="w"),
        "step": looproto.create_global_step(),
    }


def test_the_chief_writes_and_the_others_only_wait(
    tmp_path: Path, engine: Callable[..., FakeEngine]
) -> None:
    fake = engine(index=1)
    manager = CheckpointManager(tmp_path, _state())
    assert manager.save(5) == str(tmp_path / "5")
    assert latest_step(tmp_path) is None  # the chief (not here) writes it
    assert fake.seen == [
        "a checkpoint save",
        "the values of checkpoint 5 (CRC-32 of each array)",
        "the end of checkpoint 5",
    ]
    manager.close()


def test_the_chief_writes_what_the_replicas_agree_on(
    tmp_path: Path, engine: Callable[..., FakeEngine]
) -> None:
    engine(index=0)
    state = _state()
    with CheckpointManager(tmp_path, state) as manager:
        manager.save(5)
    assert latest_step(tmp_path) == 5
    state["w"].assign(np.zeros(3, np.float32))
    with CheckpointManager(tmp_path, state) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "5")
    np.testing.assert_array_equal(state["w"].numpy(), np.arange(3, dtype=np.float32))


def test_replicas_that_differ_write_nothing(
    tmp_path: Path, engine: Callable[..., FakeEngine]
) -> None:
    def diverged(what: str, value: Any) -> Any:
        return {**value, "w": value["w"] + 1} if what.startswith("the values") else value

    engine(index=0, peer=diverged)
    with CheckpointManager(tmp_path, _state()) as manager:
        expected = r"(?s)values of checkpoint 5.*'w': process 0: \d+, process 1: \d+.*per-process"
        with pytest.raises(DistributedError, match=expected):
            manager.save(5)
    assert latest_step(tmp_path) is None


def test_a_failed_save_on_the_chief_fails_every_process(
    tmp_path: Path, engine: Callable[..., FakeEngine]
) -> None:
    def chief_failed(what: str, value: Any) -> Any:
        return "disk full" if what == "the end of checkpoint 5" else value

    engine(index=1, peer=chief_failed)
    with CheckpointManager(tmp_path, _state()) as manager:
        with pytest.raises(CheckpointError, match=r"Process 0 failed to save checkpoint 5: disk"):
            manager.save(5)


def test_every_process_must_restore_the_same_checkpoint(
    tmp_path: Path, engine: Callable[..., FakeEngine]
) -> None:
    with CheckpointManager(tmp_path, _state()) as manager:
        manager.save(5)
    engine(index=1, peer=lambda what, value: {"step": -1} if "restore" in what else value)
    with CheckpointManager(tmp_path, _state()) as manager:
        with pytest.raises(DistributedError, match=r"(?s)which checkpoint to restore.*'step': "
                           r"process 0: -1, process 1: 5.*is the directory shared"):  # fmt: skip
            manager.restore_or_initialize()


def test_the_controller_checks_that_the_global_step_agrees(
    engine: Callable[..., FakeEngine],
) -> None:
    from tests.helpers import TestRunner

    runner = TestRunner()
    engine(peer=lambda what, value: {"global_step": value["global_step"] + 1})
    with pytest.raises(DistributedError, match=r"(?s)the global step at the start.*"
                       r"'global_step': process 0: 0, process 1: 1"):  # fmt: skip
        looproto.Controller(trainer=runner, global_step=runner.global_step, steps_per_loop=2)


# ----------------------------------------------------------------------------
# Data: each process's slice of every global batch


@pytest.mark.parametrize("count", [2, 3])
def test_shards_together_are_the_global_batches(count: int) -> None:
    data = {"x": np.arange(60).reshape(30, 2), "y": np.arange(30)}
    whole = ArrayDataset(data, 6, shuffle=True, seed=4, epochs=2)
    shards = [
        ArrayDataset(data, 6, shuffle=True, seed=4, epochs=2, shard=(i, count))
        for i in range(count)
    ]
    batches = list(whole)
    per_shard = [list(shard) for shard in shards]
    assert all(len(b) == len(batches) for b in per_shard)
    for step, batch in enumerate(batches):
        parts = [b[step] for b in per_shard]
        assert all(len(p["y"]) == 6 // count for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), batch["x"])
        np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), batch["y"])


def test_a_short_last_batch_is_split_as_evenly_as_it_goes() -> None:
    parts = [
        [b.tolist() for b in ArrayDataset(np.arange(7), 4, drop_remainder=False, shard=(i, 2))]
        for i in range(2)
    ]
    assert parts == [[[0, 1], [4]], [[2, 3], [5, 6]]]


def test_a_sharded_iterator_resumes_from_its_state() -> None:
    dataset = ArrayDataset(np.arange(40), 4, shuffle=True, seed=1, epochs=None, shard=(1, 2))
    it = iter(dataset)
    for _ in range(7):
        next(it)
    again = iter(dataset)
    again.set_state(json.loads(json.dumps(it.get_state())))
    assert [next(again).tolist() for _ in range(5)] == [next(it).tolist() for _ in range(5)]


@pytest.mark.parametrize(
    ("shard", "match"),
    [
        ((0, 3), r"`batch_size` \(4\) must be divisible by the number of processes in `shard` \(3"),
        ((2, 2), r"0 <= index < count.*shard=\(2, 2\)"),
        ([0, 2], r"must be a tuple `\(index, count\)`"),
    ],
)
def test_bad_shards_are_config_errors(shard: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ArrayDataset(np.arange(8), 4, shard=shard)


# ----------------------------------------------------------------------------
# Config, CLI and launcher


def test_the_distributed_table_is_validated(tmp_path: Path) -> None:
    raw = {"trainer": "m:f", "train": {"steps": 10}, "distributed": {"num_processes": 4}}
    parsed = config.parse(raw)
    assert parsed.distributed == config.DistributedConfig(num_processes=4, timeout=300.0)
    raw["distributed"] = {"num_process": 2}
    with pytest.raises(ConfigError, match=r"unknown key `distributed.num_process`.*Did you mean"):
        config.parse(raw)
    raw["distributed"] = {"timeout": 0}
    with pytest.raises(ConfigError, match=r"`distributed.timeout` must be > 0 seconds; received 0"):
        config.parse(raw)
    raw["distributed"] = {"num_processes": 0}
    with pytest.raises(ConfigError, match=r"`distributed.num_processes` must be a positive"):
        config.parse(raw)


def _config(tmp_path: Path, backend: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(
        textwrap.dedent(f"""
            backend = "{backend}"
            [trainer]
            factory = "looproto.examples.mlp:trainer"
            [train]
            steps = 10
        """)
    )
    return str(path)


def test_cli_refuses_what_cannot_run_on_several_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LOOPROTO_BACKEND", raising=False)
    numpy_config = _config(tmp_path, "numpy")
    assert cli.main(["train", numpy_config, "--num-processes", "2"]) == cli.EXIT_USAGE
    assert "'numpy' backend has no distributed engine" in capsys.readouterr().err
    assert cli.main(["train", numpy_config, "--num-processes", "0"]) == cli.EXIT_USAGE
    assert "`--num-processes` must be a positive integer; received 0" in capsys.readouterr().err
    # Under torchrun, a backend that is not torch's would train N times side by side.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", numpy_config]) == cli.EXIT_USAGE
    assert "launched as one of 2 torch workers" in capsys.readouterr().err


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_launch_gives_each_worker_its_place(tmp_path: Path) -> None:
    code = f"""
        import os, pathlib
        i = os.environ["LOOPROTO_PROCESS_ID"]
        count = os.environ["LOOPROTO_NUM_PROCESSES"]
        text = count + " " + os.environ["LOOPROTO_COORDINATOR_ADDRESS"]
        pathlib.Path({str(tmp_path)!r}, i).write_text(text)
    """
    assert launch.launch(_python(code), backend="jax", num_processes=3, timeout=5) == 0
    seen = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(seen) == ["0", "1", "2"]
    assert {count for count, _ in seen.values()} == {"3"}
    assert len({address for _, address in seen.values()}) == 1


def test_launch_stops_the_others_once_one_failed(capfd: pytest.CaptureFixture[str]) -> None:
    code = """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(5)
        time.sleep(60)  # a worker that never notices
    """
    start = time.monotonic()
    code_ = launch.launch(_python(code), backend="torch", num_processes=2, timeout=1, grace=1)
    assert code_ == 5
    assert time.monotonic() - start < 20
    err = capfd.readouterr().err
    assert "worker 1 exited with status 5; waiting up to 1 s for the other workers" in err
    assert "killing workers [0], still running 1 s after another worker failed" in err
    assert "worker 0 exited with status -9" in err


def test_launch_rejects_a_bad_count() -> None:
    with pytest.raises(ConfigError, match=r"`num_processes` must be a positive int"):
        launch.launch(["true"], backend="torch", num_processes=0)


def test_importing_distributed_imports_no_framework() -> None:
    code = (
        "import looproto.distributed, sys; "
        "names = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted({'jax', 'torch', 'tensorflow', 'orbax'} & names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout
    assert out.strip() == "[]"


def test_cli_launches_the_configured_number_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOOPROTO_BACKEND", raising=False)
    calls: list[dict[str, Any]] = []

    def fake_launch(command: list[str], **kwargs: Any) -> int:
        calls.append({"command": command, **kwargs})
        return 0

    monkeypatch.setattr(launch, "launch", fake_launch)
    path = Path(_config(tmp_path, "torch"))
    path.write_text(path.read_text() + "\n[distributed]\nnum_processes = 2\ntimeout = 45\n")
    assert cli.main(["train", str(path), "--set", "train.steps=5"]) == 0
    assert cli.main(["train", str(path), "--num-processes", "3"]) == 0
    first, second = calls
    assert (first["backend"], first["num_processes"], first["timeout"]) == ("torch", 2, 45.0)
    assert second["num_processes"] == 3
    # Each worker is `looproto train` again, with the same overrides and no progress bar.
    assert first["command"][:3] == [sys.executable, "-m", "looproto"]
    assert first["command"][3:] == ["train", str(path), "--no-progress", "--set=train.steps=5"]


def test_a_worker_is_not_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LOOPROTO_BACKEND", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    path = _config(tmp_path, "torch")
    assert cli.main(["train", path, "--num-processes", "3"]) == cli.EXIT_USAGE
    assert "launched as one of 2 (its environment says so)" in capsys.readouterr().err
