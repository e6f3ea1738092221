"""Tests for `looproto.checkpoint`: TF manager semantics, integrity, fallback, async."""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from looproto.checkpoint import (
    CheckpointManager,
    checkpoints_iterator,
    latest_step,
)
from looproto.checkpoint._state import json_crc32
from looproto.data import ArrayDataset
from looproto.errors import CheckpointError, ConfigError, NonFiniteError
from looproto.module import Module, Variable

# ----------------------------------------------------------------------------
# Helpers


class Dense(Module):
    def __init__(self, n_in: int, n_out: int, name: str | None = None) -> None:
        super().__init__(name=name)
        self.w = Variable(np.zeros((n_in, n_out), np.float32), name="w")
        self.b = Variable(np.zeros(n_out, np.float32), name="b")


class Model(Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [Dense(2, 3), Dense(3, 1)]
        self.count = Variable(np.zeros(4, np.int64), trainable=False, name="count")
        self.flag = Variable(np.array(False), trainable=False, name="flag")
        self.scale = Variable(np.float64(1.0), name="scale")


class CountingIterator:
    """Follows the iterator-state protocol."""

    def __init__(self) -> None:
        self.epoch = 0
        self.position = 0

    def __next__(self) -> int:
        self.position += 1
        return self.position

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": np.int64(self.position)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]


def fill(model: Model, value: float) -> None:
    for layer in model.layers:
        layer.w.assign(np.full(layer.w.shape, value, np.float32))
        layer.b.assign(np.full(layer.b.shape, value, np.float32))
    model.count.assign(np.full(4, int(value), np.int64))
    model.flag.assign(np.array(value > 0))
    model.scale.assign(np.float64(value))


def snapshot(root: Any) -> dict[str, np.ndarray[Any, Any]]:
    from looproto.module import variables_by_path

    return {path: np.array(v.value) for path, v in variables_by_path(root).items()}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == b[key].dtype


class BigModel(Module):
    """Random float32 state large enough that orbax writes separate data chunks."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.a = Variable(rng.standard_normal(100_000).astype(np.float32), name="a")
        self.b = Variable(rng.standard_normal((300, 300)).astype(np.float32), name="b")

    def set(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.a.assign(rng.standard_normal(100_000).astype(np.float32))
        self.b.assign(rng.standard_normal((300, 300)).astype(np.float32))


# ----------------------------------------------------------------------------
# Round trip


def test_round_trip_restores_float_int_bool_and_scalar_variables_by_path(tmp_path: Path) -> None:
    model = Model()
    fill(model, 3.0)
    saved = snapshot({"model": model})
    with CheckpointManager(tmp_path, {"model": model}) as manager:
        path = manager.save(checkpoint_number=7)
        assert path == str(tmp_path / "7")
        fill(model, -1.0)
        assert manager.restore(7) == path
    assert_same(snapshot({"model": model}), saved)
    assert model.scale.value.shape == ()
    assert model.flag.value.dtype == np.bool_


def test_metadata_item_is_readable_json_keyed_by_variable_path(tmp_path: Path) -> None:
    model = Model()
    with CheckpointManager(tmp_path, {"model": model}) as manager:
        manager.save(checkpoint_number=1)
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert meta["step"] == 1
    assert meta["tree"]["model/layers/0/w"]["shape"] == [2, 3]
    assert meta["tree"]["model/layers/0/w"]["dtype"] == "float32"
    assert meta["tree"]["model/flag"]["dtype"] == "bool"
    assert isinstance(meta["tree"]["model/scale"]["crc32"], int)
    assert sorted(meta["tree"]) == sorted(snapshot({"model": model}))


def test_restore_accepts_a_path_from_another_directory(tmp_path: Path) -> None:
    model = Model()
    fill(model, 2.0)
    with CheckpointManager(tmp_path / "a", model) as manager:
        path = manager.save(checkpoint_number=5)
    assert path is not None
    fill(model, 0.0)
    with CheckpointManager(tmp_path / "b", model) as other:
        assert other.restore(path) == path
    assert float(model.scale.value) == 2.0


def test_restore_of_a_missing_step_raises_checkpoint_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, Model()) as manager:
        manager.save(checkpoint_number=1)
        with pytest.raises(CheckpointError, match=r"No checkpoint 3 .*\[1\]"):
            manager.restore(3)
        with pytest.raises(CheckpointError, match="step number or a path"):
            manager.restore(str(tmp_path / "latest"))


def test_module_with_only_an_iterator_round_trips(tmp_path: Path) -> None:
    holder = Module(name="holder")
    holder.it = CountingIterator()  # type: ignore[attr-defined]
    for _ in range(5):
        next(holder.it)  # type: ignore[attr-defined]
    with CheckpointManager(tmp_path, holder) as manager:
        manager.save(checkpoint_number=1)
        next(holder.it)  # type: ignore[attr-defined]
        manager.restore(1)
    assert holder.it.position == 5  # type: ignore[attr-defined]


def test_iterator_state_and_numpy_generators_round_trip(tmp_path: Path) -> None:
    iterator = CountingIterator()
    iterator.epoch, iterator.position = 2, 41
    generators = {
        "pcg": np.random.default_rng(1),
        "mt": np.random.Generator(np.random.MT19937(2)),
        "philox": np.random.Generator(np.random.Philox(3)),
    }
    for gen in generators.values():
        gen.random(7)  # advance away from the seed
    root = {"data": iterator, "rng": generators, "w": Variable(np.ones(2, np.float32))}
    with CheckpointManager(tmp_path, root) as manager:
        manager.save(checkpoint_number=1)
        expected = {name: gen.random(5) for name, gen in generators.items()}
        iterator.epoch, iterator.position = 9, 9
        manager.restore(1)
    assert (iterator.epoch, iterator.position) == (2, 41)
    for name, gen in generators.items():
        np.testing.assert_array_equal(gen.random(5), expected[name])


def test_state_that_is_not_json_raises_at_save_time(tmp_path: Path) -> None:
    class Bad:
        def get_state(self) -> Any:
            return {"f": object()}

        def set_state(self, state: Any) -> None:
            pass

    with CheckpointManager(tmp_path, {"bad": Bad()}) as manager:
        with pytest.raises(CheckpointError, match=r"'bad'.*expected JSON data"):
            manager.save(checkpoint_number=1)
    assert latest_step(tmp_path) is None


def test_restore_never_calls_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model()
    fill(model, 4.0)
    root = {"model": model, "it": CountingIterator(), "rng": np.random.default_rng(0)}
    with CheckpointManager(tmp_path, root) as manager:
        manager.save(checkpoint_number=1)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    fill(model, 0.0)
    with CheckpointManager(tmp_path, root) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "1")
    assert float(model.scale.value) == 4.0


# ----------------------------------------------------------------------------
# Save semantics (tf.train.CheckpointManager's)


def test_checkpoint_number_defaults_to_step_counter(tmp_path: Path) -> None:
    step = Variable(np.int64(12), trainable=False)
    with CheckpointManager(tmp_path, {"step": step}, step_counter=step) as manager:
        assert manager.save() == str(tmp_path / "12")


def test_checkpoint_number_without_step_counter_counts_up_from_disk(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, Model()) as manager:
        assert manager.save() == str(tmp_path / "1")
        assert manager.save() == str(tmp_path / "2")


def test_interval_saves_first_then_every_interval_steps(tmp_path: Path) -> None:
    step = Variable(np.int64(3), trainable=False)
    with CheckpointManager(
        tmp_path, {"step": step}, step_counter=step, checkpoint_interval=10, max_to_keep=None
    ) as manager:
        saved = []
        for value in [3, 3, 5, 12, 13, 14, 23, 24, 40]:
            step.assign(np.int64(value))
            if manager.save(checkpoint_number=value) is not None:
                saved.append(value)
    assert saved == [3, 13, 23, 40]  # first save always; then >= last + 10


def test_interval_check_interval_false_saves_early_but_not_twice(tmp_path: Path) -> None:
    step = Variable(np.int64(0), trainable=False)
    with CheckpointManager(
        tmp_path, {"step": step}, step_counter=step, checkpoint_interval=100
    ) as manager:
        assert manager.save(checkpoint_number=0) is not None
        step.assign(np.int64(1))
        assert manager.save(checkpoint_number=1) is None
        assert manager.save(checkpoint_number=1, check_interval=False) is not None
        assert manager.save(checkpoint_number=1, check_interval=False) is None


def test_restore_or_initialize_sets_last_checkpoint_step_for_the_interval(tmp_path: Path) -> None:
    step = Variable(np.int64(50), trainable=False)
    root = {"step": step}
    with CheckpointManager(tmp_path, root, step_counter=step, checkpoint_interval=10) as manager:
        manager.save(checkpoint_number=50)
    step.assign(np.int64(0))
    with CheckpointManager(tmp_path, root, step_counter=step, checkpoint_interval=10) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "50")
        assert int(step) == 50
        step.assign(np.int64(55))
        assert manager.save(checkpoint_number=55) is None  # 55 < 50 + 10
        step.assign(np.int64(60))
        assert manager.save(checkpoint_number=60) == str(tmp_path / "60")


def test_interval_without_step_counter_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`checkpoint_interval`.*`step_counter`"):
        CheckpointManager(tmp_path, Model(), checkpoint_interval=5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True])
def test_max_to_keep_must_be_a_positive_int(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"`max_to_keep`.*received max_to_keep={bad!r}"):
        CheckpointManager(tmp_path, Model(), max_to_keep=bad)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"checkpoint_interval": "5", "step_counter": 0}, "checkpoint_interval"),
        ({"checkpoint_interval": 2.5, "step_counter": 0}, "checkpoint_interval"),
        ({"step_counter": "12"}, "step_counter"),
        ({"step_counter": object()}, "step_counter"),
        ({"init_fn": 3}, "init_fn"),
        ({"enable_async": "yes"}, "enable_async"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_them(
    tmp_path: Path, kwargs: dict[str, Any], argument: str
) -> None:
    with pytest.raises(ConfigError, match=f"`{argument}`"):
        CheckpointManager(tmp_path, Model(), **kwargs)


@pytest.mark.parametrize("bad", [None, "", 3, b"/tmp/x"])
def test_directory_must_be_a_path(bad: Any) -> None:
    with pytest.raises(ConfigError, match="`directory`"):
        CheckpointManager(bad, Model())


def test_max_to_keep_keeps_the_newest_and_checkpoints_lists_them(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, Model(), max_to_keep=2) as manager:
        for step in range(1, 6):
            manager.save(checkpoint_number=step)
        assert manager.checkpoints == [str(tmp_path / "4"), str(tmp_path / "5")]
        assert manager.latest_checkpoint == str(tmp_path / "5")


def test_max_to_keep_none_keeps_all(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, Model(), max_to_keep=None) as manager:
        for step in range(1, 8):
            manager.save(checkpoint_number=step)
        assert len(manager.checkpoints) == 7


def test_saving_an_existing_step_from_an_earlier_run_skips_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model()
    fill(model, 1.0)
    with CheckpointManager(tmp_path, model) as manager:
        manager.save(checkpoint_number=10)
    fill(model, 2.0)
    with CheckpointManager(tmp_path, model) as manager, caplog.at_level(logging.WARNING):
        assert manager.save(checkpoint_number=10) is None
        assert "Not saving checkpoint 10" in caplog.text
        assert "already exists" in caplog.text
        caplog.clear()
        assert manager.save(checkpoint_number=4) is None
        assert "older than the newest checkpoint 10" in caplog.text
        fill(model, 0.0)
        manager.restore(10)
    assert float(model.scale.value) == 1.0  # not overwritten


def test_restore_or_initialize_calls_init_fn_when_there_is_no_checkpoint(tmp_path: Path) -> None:
    calls = []
    with CheckpointManager(tmp_path, Model(), init_fn=lambda: calls.append(1)) as manager:
        assert manager.restore_or_initialize() is None
        assert manager.latest_checkpoint is None
        assert manager.checkpoints == []
    assert calls == [1]


def test_restore_or_initialize_restores_the_newest(tmp_path: Path) -> None:
    model = Model()
    calls = []
    with CheckpointManager(tmp_path, model, init_fn=lambda: calls.append(1)) as manager:
        for step in (1, 2):
            fill(model, float(step))
            manager.save(checkpoint_number=step)
        fill(model, 0.0)
        assert manager.restore_or_initialize() == str(tmp_path / "2")
    assert float(model.scale.value) == 2.0
    assert calls == []


# ----------------------------------------------------------------------------
# Tree mismatch: a user error, reported in full, nothing restored


def _mismatch_cases() -> dict[str, tuple[Any, str]]:
    return {
        "missing": (lambda m: setattr(m, "extra", Variable(np.zeros(2))), r"'extra'.*not in the"),
        "extra": (lambda m: delattr(m, "flag"), r"'flag'.*not a live variable"),
        "reshaped": (
            lambda m: setattr(m.layers[0], "w", Variable(np.zeros((3, 3), np.float32))),
            r"'layers/0/w': checkpoint shape=\(2, 3\) dtype=float32, live shape=\(3, 3\)",
        ),
        "retyped": (
            lambda m: setattr(m, "count", Variable(np.zeros(4, np.int32))),
            r"'count': checkpoint shape=\(4,\) dtype=int64, live shape=\(4,\) dtype=int32",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "extra", "reshaped", "retyped"])
def test_tree_mismatch_raises_listing_the_path_and_restores_nothing(
    tmp_path: Path, case: str
) -> None:
    change, pattern = _mismatch_cases()[case]
    model = Model()
    fill(model, 5.0)
    with CheckpointManager(tmp_path, model) as manager:
        manager.save(checkpoint_number=1)
    fill(model, 7.0)
    change(model)
    before = snapshot(model)
    with CheckpointManager(tmp_path, model) as manager:
        with pytest.raises(CheckpointError, match=pattern):
            manager.restore(1)
        with pytest.raises(CheckpointError, match=pattern):
            manager.restore_or_initialize()  # not treated as corruption
    assert_same(snapshot(model), before)


def test_mismatch_error_lists_every_differing_path(tmp_path: Path) -> None:
    model = Model()
    with CheckpointManager(tmp_path, model) as manager:
        manager.save(checkpoint_number=1)
    for change, _ in _mismatch_cases().values():
        change(model)
    with CheckpointManager(tmp_path, model) as manager:
        with pytest.raises(CheckpointError, match="4 difference") as info:
            manager.restore(1)
    for name in ("'extra'", "'flag'", "'layers/0/w'", "'count'"):
        assert name in str(info.value)


class PickyIterator(CountingIterator):
    """Refuses a state it does not understand (as an `ArrayIterator` does a `tf.data` one)."""

    def set_state(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise ConfigError(f"not a PickyIterator state: {state!r}")
        super().set_state(state)


class OtherIterator(CountingIterator):
    def get_state(self) -> dict[str, Any]:
        return {"offset": 3}


def test_an_object_refusing_its_state_undoes_the_whole_restore(tmp_path: Path) -> None:
    saved = Model()
    fill(saved, 5.0)
    saved.rng = np.random.default_rng(1)
    saved.stream = OtherIterator()  # same kind ("state") and path, another pipeline's state
    with CheckpointManager(tmp_path, saved) as manager:
        manager.save(checkpoint_number=1)
    live = Model()
    fill(live, 7.0)
    live.rng = np.random.default_rng(2)  # restored first (paths in order), then undone
    live.stream = PickyIterator()
    live.stream.position = 4
    rng_state = live.rng.bit_generator.state
    before = snapshot(live)
    with CheckpointManager(tmp_path, live) as manager:
        with pytest.raises(CheckpointError, match=r"writing 'stream' failed \(ConfigError") as info:
            manager.restore(1)
    assert "Nothing was restored" in str(info.value)
    assert isinstance(info.value.__cause__, ConfigError)
    assert_same(snapshot(live), before)
    assert live.stream.position == 4
    assert live.rng.bit_generator.state == rng_state


class FailOnce(Variable):
    """A variable whose next `assign` fails (a device error, say)."""

    __slots__ = ("fail",)

    def assign(self, value: Any) -> Variable:
        if getattr(self, "fail", False):
            self.fail = False
            raise RuntimeError("device lost")
        return super().assign(value)


def test_a_failing_variable_write_undoes_the_variables_written_before(tmp_path: Path) -> None:
    saved = Model()
    fill(saved, 5.0)
    saved.zz_last = Variable(np.float32(5.0), name="zz_last")
    with CheckpointManager(tmp_path, saved) as manager:
        manager.save(checkpoint_number=1)
    live = Model()
    fill(live, 7.0)
    live.zz_last = FailOnce(np.float32(7.0), name="zz_last")
    live.zz_last.fail = True
    before = snapshot(live)
    with CheckpointManager(tmp_path, live) as manager:
        with pytest.raises(CheckpointError, match=r"writing 'zz_last' failed \(RuntimeError"):
            manager.restore(1)
    assert_same(snapshot(live), before)  # layers/..., count, flag, scale: put back


# ----------------------------------------------------------------------------
# Corruption: fall back to the previous good step, loudly


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_size)


def _overwrite_bytes(step_dir: Path) -> None:
    target = _data_files(step_dir)[-1]
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        f.write(b"\x00" * 64)


def _truncate(step_dir: Path) -> None:
    target = _data_files(step_dir)[-1]
    with open(target, "r+b") as f:
        f.truncate(100)


def _delete_state(step_dir: Path) -> None:
    import shutil

    shutil.rmtree(step_dir / "state")


def _delete_meta(step_dir: Path) -> None:
    import shutil

    shutil.rmtree(step_dir / "meta")


def _garble_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text("{not json")


_DAMAGE = {
    "overwrite_64_bytes": _overwrite_bytes,
    "truncate_data_file": _truncate,
    "delete_state_dir": _delete_state,
    "delete_meta_dir": _delete_meta,
    "garble_meta": _garble_meta,
}


# When one array read fails, orbax closes its event loop while tensorstore still
# finishes the other reads; their callbacks then raise "Event loop is closed" in a
# tensorstore thread, which Python reports as an unraisable exception. Harmless
# noise (the failure itself is handled); let those callbacks land inside the test.
_ignore_orbax_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def settle() -> Iterator[None]:
    yield
    time.sleep(0.3)
    gc.collect()


@_ignore_orbax_noise
@pytest.mark.usefixtures("settle")
@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_restore_or_initialize_falls_back_past_a_corrupted_newest_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    model = BigModel()
    with CheckpointManager(tmp_path, model) as manager:
        for step in (1, 2):
            model.set(step)
            manager.save(checkpoint_number=step)
    model.set(1)
    expected = snapshot(model)
    _DAMAGE[damage](tmp_path / "2")
    model.set(99)
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, model) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "1")
        # Set aside, not deleted: no longer listed, so step 2 can be saved again.
        with pytest.raises(CheckpointError, match=r"No checkpoint 2 .*\[1\]"):
            manager.restore(2)
        assert manager.checkpoints == [str(tmp_path / "1")]
        assert manager.save(checkpoint_number=2) == str(tmp_path / "2")
    assert "Skipping corrupted checkpoint 2" in caplog.text
    (moved,) = [name for name in os.listdir(tmp_path) if name.startswith("2.corrupted-")]
    assert moved in caplog.text
    assert_same(snapshot(model), expected)


@_ignore_orbax_noise
@pytest.mark.usefixtures("settle")
def test_overwritten_bytes_never_restore_silently(tmp_path: Path) -> None:
    model = BigModel()
    with CheckpointManager(tmp_path, model) as manager:
        manager.save(checkpoint_number=1)
    target = _data_files(tmp_path / "1")[-1]
    original = target.read_bytes()
    model.set(5)
    before = snapshot(model)
    with CheckpointManager(tmp_path, model) as manager:
        for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
            damaged = bytearray(original)
            offset = int(len(original) * fraction)
            damaged[offset : offset + 64] = bytes(64)
            target.write_bytes(bytes(damaged))
            # Either tensorstore notices (zstd frame) or the CRC-32 does; never garbage.
            with pytest.raises(CheckpointError, match=r"corrupted|unreadable"):
                manager.restore(1)
            assert_same(snapshot(model), before)


def test_checksum_mismatch_is_reported_as_corruption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = BigModel()
    with CheckpointManager(tmp_path, model) as manager:
        for step in (1, 2):
            model.set(step)
            manager.save(checkpoint_number=step)
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["tree"]["b"]["crc32"] ^= 1
    meta["crc32"] = json_crc32(meta)  # a consistent JSON item: the array data differs
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, model) as manager:
        with pytest.raises(CheckpointError, match=r"'b': CRC-32 \d+ does not match"):
            manager.restore(2)
        assert manager.restore_or_initialize() == str(tmp_path / "1")
    assert "CRC-32" in caplog.text
    reference = BigModel()
    reference.set(1)
    assert_same(snapshot(model), snapshot(reference))


@pytest.mark.parametrize(
    "flip",
    [
        lambda meta: meta["objects"]["it"]["state"].update(batch=17),  # a position digit
        lambda meta: meta["tree"]["w"].update(shape=[3, 3]),  # a shape
        lambda meta: meta.update(step=1),
    ],
)
def test_a_flipped_value_in_the_json_item_is_corruption_not_a_silent_restore(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, flip: Any
) -> None:
    def make() -> dict[str, Any]:
        return {"w": Variable(np.zeros((3, 2), np.float32)), "it": CountingIterator()}

    root = make()
    with CheckpointManager(tmp_path, root) as manager:
        for step in (1, 2):
            root["it"].position = 10 * step
            manager.save(checkpoint_number=step)
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    flip(meta)
    meta_file.write_text(json.dumps(meta))
    fresh = make()
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, fresh) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "1")
    assert "damaged metadata item" in caplog.text
    assert fresh["it"].position == 10


def _edit_meta(step_dir: Path, edit: Any) -> None:
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_the_json_items_checksum_is_required_from_format_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def make() -> dict[str, Any]:
        return {"w": Variable(np.zeros((3, 2), np.float32)), "it": CountingIterator()}

    live = make()
    with CheckpointManager(tmp_path, live) as manager:
        for step in (1, 2):
            live["it"].position = 10 * step
            manager.save(checkpoint_number=step)
    assert json.loads((tmp_path / "2" / "meta" / "metadata").read_text())["version"] == 2

    # An edited position with the checksum removed: damage, not an older format.
    def strip(meta: dict[str, Any]) -> None:
        meta["objects"]["it"]["state"].update(batch=17)
        del meta["crc32"]

    _edit_meta(tmp_path / "2", strip)
    fresh = make()
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, fresh) as manager:
        with pytest.raises(CheckpointError, match=r"no `crc32` key, which format version 2"):
            manager.restore(2)
        assert manager.restore_or_initialize() == str(tmp_path / "1")
    assert fresh["it"].position == 10
    assert "no `crc32` key" in caplog.text


def test_an_older_format_without_a_checksum_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = {"w": Variable(np.ones(3, np.float32)), "it": CountingIterator()}
    live["it"].position = 7
    with CheckpointManager(tmp_path, live) as manager:
        manager.save(checkpoint_number=1)

    def as_format_1(meta: dict[str, Any]) -> None:  # what looproto 0.1 wrote at first
        meta["version"] = 1
        del meta["crc32"]

    _edit_meta(tmp_path / "1", as_format_1)
    fresh = {"w": Variable(np.zeros(3, np.float32)), "it": CountingIterator()}
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, fresh) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "1")
        manager.restore(1)  # warned once per checkpoint
    assert fresh["it"].position == 7
    np.testing.assert_array_equal(fresh["w"].numpy(), np.ones(3, np.float32))
    warnings = [r.getMessage() for r in caplog.records if "format version 1" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "without a CRC-32 of its metadata item" in warnings[0]

    # A format-1 item that has a checksum is still checked against it.
    _edit_meta(tmp_path / "1", lambda meta: meta.update(crc32=json_crc32(meta) ^ 1))
    with CheckpointManager(tmp_path, fresh) as manager:
        with pytest.raises(CheckpointError, match="damaged metadata item: its CRC-32"):
            manager.restore(1)


def test_a_newer_format_asks_for_a_newer_looproto(tmp_path: Path) -> None:
    live = {"w": Variable(np.ones(3, np.float32))}
    with CheckpointManager(tmp_path, live) as manager:
        manager.save(checkpoint_number=1)

    def as_format_3(meta: dict[str, Any]) -> None:
        meta["version"] = 3
        meta["crc32"] = json_crc32(meta)

    _edit_meta(tmp_path / "1", as_format_3)
    with CheckpointManager(tmp_path, live) as manager:
        with pytest.raises(CheckpointError, match=r"format version 3; .* Upgrade looproto"):
            manager.restore(1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_refuses_a_non_finite_checkpoint_and_keeps_the_last_one(
    tmp_path: Path, bad: float
) -> None:
    live = {
        "w": Variable(np.ones((2, 2), np.float32)),
        "count": Variable(np.zeros(2, np.int64)),  # integers are never non-finite
    }
    with CheckpointManager(tmp_path, live, max_to_keep=1, check_finite=True) as manager:
        manager.save(checkpoint_number=1)
        live["w"].assign(np.array([[1.0, bad], [bad, 2.0]], np.float32))
        with pytest.raises(NonFiniteError) as info:
            manager.save(checkpoint_number=2)
        assert str(info.value) == (
            "Not saving checkpoint 2: variable 'w' holds 2 NaN or infinite value(s) of 4; "
            f"training diverged. Checkpoint 1 is kept in {tmp_path}."
        )
        assert manager.checkpoints == [str(tmp_path / "1")]
    with CheckpointManager(tmp_path, live, max_to_keep=1) as manager:  # the default: off
        assert manager.save(checkpoint_number=2) == str(tmp_path / "2")


def test_a_state_the_live_object_rejects_restores_nothing(tmp_path: Path) -> None:
    root = {
        "w": Variable(np.ones(2, np.float32)),
        "a_rng": np.random.default_rng(1),
        "z_rng": np.random.default_rng(2),
    }
    with CheckpointManager(tmp_path, root) as manager:
        manager.save(checkpoint_number=1)
    # The same paths, but one Generator changed its bit generator: a code change.
    live = {
        "w": Variable(np.zeros(2, np.float32)),
        "a_rng": np.random.default_rng(5),
        "z_rng": np.random.Generator(np.random.MT19937(5)),
    }
    before = live["a_rng"].bit_generator.state
    with CheckpointManager(tmp_path, live) as manager:
        with pytest.raises(CheckpointError, match=r"'z_rng' \(Generator\) rejected its saved"):
            manager.restore(1)
    assert live["a_rng"].bit_generator.state == before  # put back
    np.testing.assert_array_equal(live["w"].value, np.zeros(2, np.float32))


def test_every_step_corrupted_calls_init_fn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = BigModel()
    with CheckpointManager(tmp_path, model) as manager:
        manager.save(checkpoint_number=1)
    _delete_state(tmp_path / "1")
    calls = []
    with (
        caplog.at_level(logging.WARNING),
        CheckpointManager(tmp_path, model, init_fn=lambda: calls.append(1)) as manager,
    ):
        assert manager.restore_or_initialize() is None
    assert calls == [1]
    assert "Skipping corrupted checkpoint 1" in caplog.text


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from looproto.checkpoint import CheckpointManager
    from looproto.module import Variable
    data = np.random.default_rng(0).standard_normal(25_000_000).astype(np.float32)
    data[0] = 1.0
    w = Variable(data, name="w")
    m = CheckpointManager(sys.argv[1], {"w": w}, enable_async=False)
    m.save(checkpoint_number=1)
    data = data.copy()
    data[0] = 2.0
    w.assign(data)
    print("saving", flush=True)
    m.save(checkpoint_number=2)
    print("done", flush=True)
    m.close()
    """
)


def test_sigkill_mid_save_leaves_no_half_written_step(tmp_path: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"saving"
        time.sleep(0.3)  # the 100 MB save takes ~0.6 s: this lands mid-save
        proc.kill()
        proc.wait()
    steps = latest_step(tmp_path)
    assert steps in (1, 2)
    w = Variable(np.full(25_000_000, 7.0, np.float32), name="w")
    with CheckpointManager(tmp_path, {"w": w}) as manager:
        restored = manager.restore_or_initialize()
        assert restored is not None
        assert float(w.value[0]) == float(os.path.basename(restored))
        # The interrupted step can be written again.
        assert manager.save(checkpoint_number=3) is not None
    assert not [name for name in os.listdir(tmp_path) if "tmp" in name]  # cleaned up


# ----------------------------------------------------------------------------
# Async


def test_async_save_then_sync_round_trips(tmp_path: Path) -> None:
    model = BigModel()
    model.set(3)
    expected = snapshot(model)
    manager = CheckpointManager(tmp_path, model, enable_async=True)
    try:
        path = manager.save(checkpoint_number=1)
        model.set(4)  # mutating right after save() must not reach the checkpoint
        manager.sync()
        assert path == str(tmp_path / "1")
        assert manager.latest_checkpoint == path
        manager.restore(1)
    finally:
        manager.close()
    assert_same(snapshot(model), expected)
    manager.close()  # idempotent


def test_sync_reraises_a_failed_async_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, Model(), enable_async=True)
    manager.save(checkpoint_number=1)
    manager._manager.wait_until_finished()
    boom = RuntimeError("disk full")

    def fail() -> None:
        raise boom

    monkeypatch.setattr(manager._manager, "wait_until_finished", fail)
    with pytest.raises(CheckpointError, match=r"save of checkpoint 1.*disk full") as info:
        manager.sync()
    assert info.value.__cause__ is boom
    monkeypatch.undo()
    manager.close()
    with pytest.raises(CheckpointError, match="closed"):
        manager.save(checkpoint_number=2)


# ----------------------------------------------------------------------------
# Listing and waiting


def test_latest_step_ignores_temporary_directories(tmp_path: Path) -> None:
    assert latest_step(tmp_path / "missing") is None
    (tmp_path / "3").mkdir()
    (tmp_path / "9.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "12").write_text("not a directory")
    assert latest_step(tmp_path) == 3


def test_checkpoints_iterator_yields_existing_then_stops_on_timeout(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, Model()) as manager:
        manager.save(checkpoint_number=1)
        manager.save(checkpoint_number=2)
    start = time.monotonic()
    found = list(checkpoints_iterator(tmp_path, timeout=0.3))
    assert found == [str(tmp_path / "2")]
    assert 0.25 < time.monotonic() - start < 3


def test_checkpoints_iterator_calls_timeout_fn_and_sees_new_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, Model())
    calls = []

    def on_timeout() -> bool:
        calls.append(1)
        if len(calls) == 1:
            manager.save(checkpoint_number=5)
            return False  # keep waiting
        return True

    try:
        found = list(checkpoints_iterator(tmp_path, timeout=0.2, timeout_fn=on_timeout))
    finally:
        manager.close()
    assert found == [str(tmp_path / "5")]
    assert calls == [1, 1]


def test_import_does_not_import_orbax_or_jax() -> None:
    code = (
        "import sys, looproto.checkpoint; "
        "print(sorted({'jax', 'orbax'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------
# Retention never costs the last good checkpoint


def test_max_to_keep_keeps_older_checkpoints_while_the_newest_is_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model()
    with CheckpointManager(tmp_path, model, max_to_keep=1) as manager:
        fill(model, 1.0)
        manager.save(checkpoint_number=1)
        original = manager._manager.save

        def lossy_save(step: int, **kwargs: Any) -> Any:
            # Storage that "commits" a step but loses its array index.
            result = original(step, **kwargs)
            (tmp_path / str(step) / "state" / "_METADATA").unlink()
            return result

        monkeypatch.setattr(manager._manager, "save", lossy_save)
        fill(model, 2.0)
        with caplog.at_level(logging.WARNING):
            manager.save(checkpoint_number=2)
        assert "Checkpoint " + str(tmp_path / "2") + " is incomplete" in caplog.text
        # 1 survives max_to_keep=1 (beside the lock this open manager holds)
        assert sorted(os.listdir(tmp_path)) == [".looproto-lock", "1", "2"]
        monkeypatch.undo()
        fill(model, 3.0)
        manager.save(checkpoint_number=3)  # good again: now 1 (and the bad 2) may go
        assert manager.checkpoints == [str(tmp_path / "3")]
    fill(model, 0.0)
    with CheckpointManager(tmp_path, model) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "3")
    assert float(model.scale.value) == 3.0


@_ignore_orbax_noise  # a failed background write leaves the same callbacks behind
def test_a_failed_async_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model()
    fill(model, 1.0)
    manager = CheckpointManager(tmp_path, model, max_to_keep=1, enable_async=True)
    try:
        manager.save(checkpoint_number=1)
        manager.sync()
        original = manager._collect

        def unserialisable(step: int) -> Any:
            arrays, meta = original(step)
            meta["step"] = np.int64(step)  # fails in orbax's background thread
            return arrays, meta

        monkeypatch.setattr(manager, "_collect", unserialisable)
        assert manager.save(checkpoint_number=2) == str(tmp_path / "2")
        with pytest.raises(CheckpointError, match="save of checkpoint 2"):
            manager.sync()
    finally:
        manager.close()
    assert latest_step(tmp_path) == 1
    fill(model, 0.0)
    with CheckpointManager(tmp_path, model) as again:
        assert again.restore_or_initialize() == str(tmp_path / "1")
    assert float(model.scale.value) == 1.0


def test_deleting_renames_the_step_away_and_leftovers_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renames: list[tuple[str, str]] = []
    rename = os.rename

    def recording_rename(src: Any, dst: Any) -> None:
        renames.append((os.path.basename(src), os.path.basename(dst)))
        rename(src, dst)

    with CheckpointManager(tmp_path, Model(), max_to_keep=1) as manager:
        manager.save(checkpoint_number=1)
        monkeypatch.setattr(os, "rename", recording_rename)
        manager.save(checkpoint_number=2)
        monkeypatch.undo()
    assert ("1", ".1.looproto-deleting") in renames
    # A crash between the rename and the end of the deletion leaves this behind:
    leftover = tmp_path / ".7.looproto-deleting"
    (leftover / "state").mkdir(parents=True)
    with CheckpointManager(tmp_path, Model()) as manager:
        assert manager.checkpoints == [str(tmp_path / "2")]
    assert not leftover.exists()


# ----------------------------------------------------------------------------
# Asynchronous saves and the end of the process

_ASYNC_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # tensorboardX is not used; keep the start fast
    import numpy as np
    from looproto.checkpoint import CheckpointManager
    from looproto.module import Variable
    data = np.random.default_rng(0).standard_normal(5_000_000).astype(np.float32)
    manager = CheckpointManager(sys.argv[1], {"w": Variable(data)}, enable_async=True)
    manager.save(checkpoint_number=1)  # returns while orbax still writes
    how = sys.argv[2]
    if how == "sys.exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("boom")
    # "return": fall off the end of the script
    """
)


@pytest.mark.parametrize("how", ["return", "sys.exit", "raise"])
def test_an_async_save_completes_when_the_interpreter_exits(tmp_path: Path, how: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _ASYNC_EXIT_SCRIPT, str(tmp_path), how],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=120,
        check=False,
    )
    assert result.returncode == (1 if how == "raise" else 0), result.stderr[-2000:]
    assert "cannot schedule new futures" not in result.stderr
    assert latest_step(tmp_path) == 1
    w = Variable(np.zeros(5_000_000, np.float32))
    with CheckpointManager(tmp_path, {"w": w}) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "1")
    expected = np.random.default_rng(0).standard_normal(5_000_000).astype(np.float32)
    np.testing.assert_array_equal(w.value, expected)


# ----------------------------------------------------------------------------
# No pickle

_NO_PICKLE_SCRIPT = textwrap.dedent(
    """
    import sys
    import pickle, _pickle, copyreg

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used to load a checkpoint")

    class Refusing:
        def __init__(self, *args, **kwargs):
            refuse()

    # Before anything else is imported: no module can keep a reference to the originals.
    for module in (pickle, _pickle):
        module.load = module.loads = refuse
        module.Unpickler = Refusing
    pickle._load = pickle._loads = refuse
    pickle._Unpickler = Refusing
    import numpy as np
    np.load = refuse
    from looproto.checkpoint import CheckpointManager, read_metadata
    from looproto.data import ArrayDataset
    from looproto.module import Variable
    root = {
        "w": Variable(np.zeros((3, 2), np.float32)),
        "n": Variable(np.int64(0)),
        "rng": np.random.default_rng(5),
        "it": iter(ArrayDataset(np.arange(10), 2)),
    }
    with CheckpointManager(sys.argv[1], root) as manager:
        assert manager.restore_or_initialize() == sys.argv[1] + "/1"
    assert root["w"].value.tolist() == [[1.5, 1.5]] * 3, root["w"].value
    assert int(root["n"].value) == 7
    assert root["it"].get_state() == {"epoch": 0, "batch": 3}
    assert read_metadata(sys.argv[1])["step"] == 1
    print("restored without pickle")
    """
)


def test_checkpoints_load_with_pickle_disabled(tmp_path: Path) -> None:
    root = {
        "w": Variable(np.full((3, 2), 1.5, np.float32)),
        "n": Variable(np.int64(7)),
        "rng": np.random.default_rng(5),
        "it": iter(ArrayDataset(np.arange(10), 2)),
    }
    for _ in range(3):
        next(root["it"])
    directory = str(tmp_path.resolve())
    with CheckpointManager(directory, root) as manager:
        manager.save(checkpoint_number=1)
    result = subprocess.run(
        [sys.executable, "-c", _NO_PICKLE_SCRIPT, directory],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored without pickle" in result.stdout
    # And the files are what they say: the JSON items parse, nothing is a pickle stream.
    for path in (tmp_path / "1").rglob("*"):
        if path.is_file() and path.name in {"metadata", "_METADATA", "_CHECKPOINT_METADATA"}:
            json.loads(path.read_text())
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), path  # pickle protocol 2+


# ----------------------------------------------------------------------------
# Iterator and RNG states of other libraries


def test_numpy_random_state_round_trips(tmp_path: Path) -> None:
    legacy = np.random.RandomState(3)
    legacy.rand(5)
    with CheckpointManager(tmp_path, {"rs": legacy}) as manager:
        manager.save(checkpoint_number=1)
        expected = legacy.rand(4)
        legacy.seed(99)
        manager.restore(1)
    np.testing.assert_array_equal(legacy.rand(4), expected)


def test_bytes_in_an_iterator_state_round_trip_as_base64_json(tmp_path: Path) -> None:
    class BytesState:
        def __init__(self) -> None:
            self.blob = b"\x00\xffstate"

        def get_state(self) -> Any:
            return {"blob": self.blob, "nested": [self.blob]}

        def set_state(self, state: Any) -> None:
            assert state["nested"] == [state["blob"]]
            self.blob = state["blob"]

    obj = BytesState()
    with CheckpointManager(tmp_path, {"obj": obj}) as manager:
        manager.save(checkpoint_number=1)
        obj.blob = b""
        manager.restore(1)
    assert obj.blob == b"\x00\xffstate"
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert meta["objects"]["obj"]["state"]["blob"] == {"__looproto_bytes__": "AP9zdGF0ZQ=="}


def test_grain_iterators_resume_where_they_were(tmp_path: Path) -> None:
    grain = pytest.importorskip("grain")
    import grain.python as gp

    dataset = grain.MapDataset.range(50).shuffle(seed=3).batch(4).to_iter_dataset()
    loader = gp.DataLoader(
        data_source=gp.RangeDataSource(0, 50, 1),
        sampler=gp.IndexSampler(
            num_records=50, shuffle=True, seed=1, num_epochs=1, shard_options=gp.NoSharding()
        ),
        operations=[gp.Batch(4)],
        worker_count=0,
    )
    iterators = {"dataset": iter(dataset), "loader": iter(loader)}  # dict / bytes states
    for it in iterators.values():
        next(it), next(it)
    with CheckpointManager(tmp_path, iterators) as manager:
        manager.save(checkpoint_number=1)
    expected = {name: [next(it).tolist() for _ in range(3)] for name, it in iterators.items()}
    fresh = {"dataset": iter(dataset), "loader": iter(loader)}
    with CheckpointManager(tmp_path, fresh) as manager:
        manager.restore(1)
    assert {name: [next(it).tolist() for _ in range(3)] for name, it in fresh.items()} == expected


def test_torchdata_stateful_dataloader_resumes_mid_epoch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> Module:
        holder = Module(name="holder")
        loader = stateful.StatefulDataLoader(
            list(range(40)),
            batch_size=3,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        # As `StandardTrainer` holds them: the loader and its iterator.
        holder.loader = loader  # type: ignore[attr-defined]
        holder.iterator = iter(loader)  # type: ignore[attr-defined]
        return holder

    holder = make()
    for _ in range(4):
        next(holder.iterator)  # type: ignore[attr-defined]
    with CheckpointManager(tmp_path, holder) as manager:
        manager.save(checkpoint_number=1)
    expected = [next(holder.iterator).tolist() for _ in range(5)]  # type: ignore[attr-defined]
    # The sampler state holds a torch tensor (the generator's state): stored as base64.
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert "__looproto_tensor__" in json.dumps(meta["objects"])
    fresh = make()
    with CheckpointManager(tmp_path, fresh) as manager:
        manager.restore(1)
    assert [next(fresh.iterator).tolist() for _ in range(5)] == expected  # type: ignore[attr-defined]


def test_torch_generator_state_round_trips(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    with CheckpointManager(tmp_path, {"gen": generator}) as manager:
        manager.save(checkpoint_number=1)
        expected = torch.rand(4, generator=generator)
        generator.manual_seed(0)
        manager.restore(1)
    assert torch.equal(torch.rand(4, generator=generator), expected)


def test_a_root_with_nothing_to_save_is_refused(tmp_path: Path) -> None:
    class Holder:  # neither a Module nor a container: looproto finds nothing in it
        def __init__(self) -> None:
            self.w = Variable(np.zeros(3, np.float32))

    with CheckpointManager(tmp_path, Holder()) as manager:
        with pytest.raises(CheckpointError, match=r"holds no variable or state"):
            manager.save(checkpoint_number=1)
        assert manager.checkpoints == []
    assert os.listdir(tmp_path) == []


def test_a_listing_that_races_a_commit_and_a_prune_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner commits step 2 and deletes step 1 between a reader's listing and its
    # checks of what it listed: the reader must not conclude there is no checkpoint.
    from looproto.checkpoint import _files

    (tmp_path / "1").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()
    listdir = os.listdir
    calls = []

    def listing_then_owner_moves(path: Any) -> list[str]:
        names = listdir(path)
        if not calls:
            time.sleep(0.01)  # the directory's modification time moves on
            os.rename(tmp_path / "2.orbax-checkpoint-tmp", tmp_path / "2")
            _files.delete_step(str(tmp_path), 1)
        calls.append(names)
        return names

    monkeypatch.setattr(_files.os, "listdir", listing_then_owner_moves)
    assert _files.committed_steps(str(tmp_path)) == [2]
    assert sorted(calls[0]) == ["1", "2.orbax-checkpoint-tmp"]  # the stale listing


def test_a_storage_failure_inside_a_tensorstore_message_is_named_by_its_errno() -> None:
    # The shape of the error a full disk gives when tensorstore writes an OCDBT manifest.
    from looproto.checkpoint._files import save_failure
    from looproto.errors import CheckpointStorageError

    raised = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/ckpt/50.orbax-checkpoint-tmp/'
        'state/manifest.ocdbt": Failed to write 114 bytes to file 8: No space left on '
        "device [os_error_code='28'] [tensorstore_spec='{\"driver\": \"zarr\"}']"
    )
    error = save_failure(raised, "Saving checkpoint 50 to /ckpt failed")
    assert isinstance(error, CheckpointStorageError)
    assert str(error) == (
        "Saving checkpoint 50 to /ckpt failed: No space left on device (ENOSPC); "
        "the previous checkpoints are kept."
    )
