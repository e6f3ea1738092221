"""Tests for `looproto.summary.SummaryManager`, reading event files back as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import looproto
from looproto._events import read_events
from looproto.errors import ConfigError, ProtocolError
from looproto.summary import SummaryManager


def _event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def _accumulator(run_dir: Path) -> Any:
    accumulator_module = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    accumulator = accumulator_module.EventAccumulator(
        str(run_dir), size_guidance={"scalars": 0, "histograms": 0}
    )
    accumulator.Reload()
    return accumulator


def test_nested_dict_is_seen_by_tensorboard_as_nested_runs(tmp_path: Path) -> None:
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries(
            {"steps_per_second": 3.25, "dataset": {"loss": 0.5, "accuracy": 0.75}}, step=10
        )
        manager.write_summaries({"dataset": {"loss": 0.25, "weights": np.arange(6.0)}}, step=20)

    root = _accumulator(tmp_path)
    assert root.Tags()["scalars"] == ["steps_per_second"]
    assert [(e.step, e.value) for e in root.Scalars("steps_per_second")] == [(10, 3.25)]
    dataset = _accumulator(tmp_path / "dataset")
    assert sorted(dataset.Tags()["scalars"]) == ["accuracy", "loss"]
    assert [(e.step, e.value) for e in dataset.Scalars("loss")] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, e.value) for e in dataset.Scalars("accuracy")] == [(10, 0.75)]
    (histogram,) = dataset.Histograms("weights")
    assert histogram.step == 20
    assert histogram.histogram_value.num == 6
    assert histogram.histogram_value.max == 5.0


def test_purge_step_makes_tensorboard_drop_stale_events(tmp_path: Path) -> None:
    crashed = SummaryManager(tmp_path)
    for step in (1, 2, 3, 4):
        crashed.write_summaries({"loss": float(step), "eval": {"acc": float(step)}}, step=step)
    crashed.close()

    with SummaryManager(tmp_path, purge_step=3) as resumed:
        resumed.write_summaries({"loss": 30.0, "eval": {"acc": 30.0}}, step=3)
        resumed.write_summaries({"loss": 40.0}, step=4)

    loss = [(e.step, e.value) for e in _accumulator(tmp_path).Scalars("loss")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    acc = [(e.step, e.value) for e in _accumulator(tmp_path / "eval").Scalars("acc")]
    assert acc == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_nested_dict_writes_nested_directories(tmp_path: Path) -> None:
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries(
            {"steps_per_second": 3.25, "dataset": {"loss": 0.5, "sub": {"x": 1}}}, step=7
        )

    assert read_events(tmp_path) == {
        ".": {"steps_per_second": [(7, 3.25)]},
        "dataset": {"loss": [(7, 0.5)]},
        "dataset/sub": {"x": [(7, 1.0)]},
    }


def test_values_are_on_disk_after_flush_without_close(tmp_path: Path) -> None:
    manager = SummaryManager(tmp_path)
    for step in range(5):
        manager.write_summaries({"loss": step / 2, "eval": {"acc": step / 4}}, step=step)
    manager.flush()

    events = read_events(tmp_path)
    assert events["."]["loss"] == [(step, step / 2) for step in range(5)]
    assert events["eval"]["acc"] == [(step, step / 4) for step in range(5)]

    manager.write_summaries({"loss": 9.0}, step=9)
    manager.flush()
    assert read_events(tmp_path)["."]["loss"][-1] == (9, 9.0)
    manager.close()


def test_values_are_durable_after_flush_in_another_process(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from looproto.summary import SummaryManager\n"
        "m = SummaryManager(sys.argv[1])\n"
        "m.write_summaries({'loss': 1.5, 'eval': {'acc': 0.5}}, step=3)\n"
        "m.flush()\n"
        "os._exit(0)\n"  # no close, no interpreter cleanup: only what flush() made durable
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)

    assert read_events(tmp_path) == {".": {"loss": [(3, 1.5)]}, "eval": {"acc": [(3, 0.5)]}}


def test_flush_hands_data_to_the_os_and_only_sync_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    manager = SummaryManager(tmp_path)
    manager.write_summaries({"loss": 1.0, "eval": {"acc": 0.5}}, step=1)
    manager.flush()
    manager.flush()  # nothing new: no work
    assert synced == []
    assert read_events(tmp_path)["eval"]["acc"] == [(1, 0.5)]
    manager.sync()
    assert len(synced) == 2  # one per event file written since the last sync
    manager.sync()
    assert len(synced) == 2
    manager.write_summaries({"loss": 2.0}, step=2)
    manager.close()  # close fsyncs each file
    assert len(synced) == 4


def test_two_managers_on_one_directory_in_the_same_second_both_survive(tmp_path: Path) -> None:
    first = SummaryManager(tmp_path)
    second = SummaryManager(tmp_path)
    first.write_summaries({"a": 1.0}, step=1)
    second.write_summaries({"b": 2.0}, step=1)
    first.close()
    second.close()
    reopened = SummaryManager(tmp_path)
    reopened.write_summaries({"a": 3.0}, step=2)
    reopened.close()

    assert len(_event_files(tmp_path)) == 3
    assert read_events(tmp_path) == {".": {"a": [(1, 1.0), (2, 3.0)], "b": [(1, 2.0)]}}


def test_directories_are_created_lazily(tmp_path: Path) -> None:
    summary_dir = tmp_path / "summaries"
    manager = SummaryManager(summary_dir, global_step=0)
    manager.flush()
    assert not summary_dir.exists()

    manager.write_summaries({"eval": {"acc": 0.5}})
    manager.write_summaries({})
    manager.flush()
    assert sorted(p.name for p in summary_dir.iterdir()) == ["eval"]
    assert [p.parent.name for p in _event_files(summary_dir)] == ["eval"]
    manager.close()


def test_disabled_manager_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    manager = SummaryManager(None)
    assert not manager.enabled
    assert manager.summary_dir is None
    with manager:
        manager.write_summaries({"loss": 1.0, "eval": {"acc": "not even checked"}})
        manager.flush()
    assert list(tmp_path.iterdir()) == []


def test_array_with_many_elements_is_a_histogram(tmp_path: Path) -> None:
    values = np.array([[-1.0, 0.0], [2.0, np.nan]], dtype=np.float32)
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries({"w": values, "one": np.array([[4.0]]), "b": np.float16(2)}, 5)

    tags = read_events(tmp_path)["."]
    ((step, histogram),) = tags["w"]
    assert step == 5
    assert histogram["num"] == 3  # the NaN is left out
    assert (histogram["min"], histogram["max"], histogram["sum"]) == (-1.0, 2.0, 1.0)
    assert sum(histogram["bucket"]) == 3
    assert tags["one"] == [(5, 4.0)]
    assert tags["b"] == [(5, 2.0)]


def test_string_leaf_raises_naming_the_key_path_and_writes_nothing(tmp_path: Path) -> None:
    manager = SummaryManager(tmp_path)
    with pytest.raises(ProtocolError, match=r"`dataset/name`='imagenet' of type str"):
        manager.write_summaries({"loss": 1.0, "dataset": {"acc": 0.5, "name": "imagenet"}}, 1)
    manager.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("summary", "match"),
    [
        ({"x": object()}, r"`x`=<object object"),
        ({"d": {"e": np.array(["a", "b"])}}, r"`d/e`="),
        ({"empty": np.zeros((0, 3))}, r"`empty` with shape \(0, 3\)"),
        ({"z": np.array([1j, 2j])}, r"`z` of dtype complex"),
        ({"..": {"x": 1.0}}, r"plain directory name; received `\.\.`"),
        ({1: 1.0}, r"non|key 1 of type int"),
    ],
)
def test_bad_leaves_and_keys_raise_protocol_error(
    tmp_path: Path, summary: dict[Any, Any], match: str
) -> None:
    manager = SummaryManager(tmp_path)
    with pytest.raises(ProtocolError, match=match):
        manager.write_summaries(summary, step=0)
    assert list(tmp_path.iterdir()) == []


def test_global_step_is_used_when_step_is_none(tmp_path: Path) -> None:
    step = looproto.create_global_step()
    with SummaryManager(tmp_path, global_step=step) as manager:
        manager.write_summaries({"loss": 1.0})
        step.assign_add(5)
        manager.write_summaries({"loss": 2.0})
        manager.write_summaries({"loss": 3.0}, step=np.int64(100))  # type: ignore[arg-type]

    assert read_events(tmp_path)["."]["loss"] == [(0, 1.0), (5, 2.0), (100, 3.0)]


def test_missing_or_bad_step_raises_config_error(tmp_path: Path) -> None:
    manager = SummaryManager(tmp_path)
    with pytest.raises(ConfigError, match=r"`step` is None and the SummaryManager has no"):
        manager.write_summaries({"loss": 1.0})
    with pytest.raises(ConfigError, match=r"`step` must be an integer; received step=True"):
        manager.write_summaries({"loss": 1.0}, step=True)
    with pytest.raises(ConfigError, match=r"`step` must be an integer .* received step=1.5"):
        manager.write_summaries({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`global_step` must be an integer"):
        SummaryManager(tmp_path, global_step="7").write_summaries({"loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_bad_summary_dir_raises_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"`summary_dir` must be a path .* received summary_dir=3"
    ):
        SummaryManager(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`purge_step` must be an integer"):
        SummaryManager("logs", purge_step="x")  # type: ignore[arg-type]


def test_summary_dir_accepts_pathlike(tmp_path: Path) -> None:
    manager = SummaryManager(tmp_path / "logs")
    assert manager.enabled
    assert manager.summary_dir == os.fspath(tmp_path / "logs")


def test_manager_is_usable_after_close(tmp_path: Path) -> None:
    manager = SummaryManager(tmp_path, purge_step=0)
    manager.write_summaries({"loss": 1.0}, step=1)
    manager.close()
    manager.close()
    manager.write_summaries({"loss": 2.0}, step=2)
    manager.close()
    assert read_events(tmp_path)["."]["loss"] == [(1, 1.0), (2, 2.0)]


def test_jax_array_leaves(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries({"loss": jnp.float32(0.5), "w": jnp.arange(4.0)}, step=jnp.int32(2))
    tags = read_events(tmp_path)["."]
    assert tags["loss"] == [(2, 0.5)]
    assert tags["w"][0][1]["num"] == 4


def test_torch_tensor_leaves(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    weight = torch.ones(3, requires_grad=True)
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries({"loss": torch.tensor(0.25), "w": weight * 2}, step=3)
    tags = read_events(tmp_path)["."]
    assert tags["loss"] == [(3, 0.25)]
    assert tags["w"][0][1]["sum"] == 6.0


def test_read_events_skips_a_truncated_final_record(tmp_path: Path) -> None:
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries({"loss": 1.0}, step=1)
        manager.write_summaries({"loss": 2.0}, step=2)
    (path,) = _event_files(tmp_path)
    data = path.read_bytes()
    for cut in (1, 4, 13, 20):
        path.write_bytes(data[:-cut])
        assert read_events(tmp_path)["."]["loss"] == [(1, 1.0)]


def test_read_events_rejects_a_corrupt_record_in_the_middle(tmp_path: Path) -> None:
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries({"loss": 1.0}, step=1)
        manager.write_summaries({"loss": 2.0}, step=2)
    (path,) = _event_files(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Corrupt record"):
        read_events(tmp_path)


def test_import_looproto_does_not_import_tensorboardx() -> None:
    code = (
        "import sys, looproto, looproto.summary, looproto._events\n"
        "print(sorted({'tensorboardX', 'torch', 'tensorboard', 'google'}"
        " & {m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_histogram_without_finite_or_bucketable_values_is_written_empty(tmp_path: Path) -> None:
    with SummaryManager(tmp_path) as manager:
        manager.write_summaries(
            {"nan": np.array([np.nan, np.inf]), "big": np.array([1e25, 3e25])}, 1
        )
    tags = read_events(tmp_path)["."]
    assert tags["nan"][0][1]["num"] == 0
    assert (tags["big"][0][1]["num"], tags["big"][0][1]["max"]) == (2, 3e25)
