"""Property-based tests (hypothesis): hostile arguments and config values.

Each test draws combinations of valid and invalid values and checks them against an
oracle written here from the documented rules, not from the implementation: every
invalid combination raises a `looproto.LooprotoError` whose message names (in
backticks) one of the arguments the oracle finds invalid, and no valid combination
raises.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import looproto  # noqa: E402
from looproto.checkpoint import CheckpointManager, read_metadata  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from looproto.errors import LooprotoError  # noqa: E402
from looproto.run import config  # noqa: E402
from tests.helpers import TestEvaluator, TestRunner  # noqa: E402

# Examples are cheap but some build orbax managers: keep the suite to seconds.
FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_MISSING = object()  # "argument not passed"
_ITERATOR = object()  # "a fresh iterator of callables"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_names_one_of(error: BaseException, names: set[str]) -> None:
    message = str(error)
    assert any(f"`{name}" in message for name in names), (names, message)


def check(call: Callable[[], Any], invalid: set[str]) -> Any:
    """`call()` raises a looproto error naming one of `invalid`, or succeeds if it is empty."""
    hypothesis.event("invalid" if invalid else "valid")
    if not invalid:
        return call()
    with pytest.raises(LooprotoError) as info:
        call()
    assert_names_one_of(info.value, invalid)
    return None


# ----------------------------------------------------------------------------
# Controller arguments


class _NoScope:
    pass


class _Scope:
    def scope(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


_RUNNER = TestRunner()
_EVALUATOR = TestEvaluator()


def pick(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes an invalid one (so both kinds of calls are common)."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(invalid))


def _weighted(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> Any:
    return st.integers(0, 9).flatmap(lambda n: invalid if n == 0 else valid)


# (valid values, invalid values) of every `Controller` argument.
CONTROLLER_ARGUMENTS: dict[str, tuple[list[Any], list[Any]]] = {
    "trainer": ([None, _RUNNER, _RUNNER], [object(), "trainer"]),
    "evaluator": ([None, _RUNNER, _EVALUATOR], [object(), 3]),
    "step_kind": (["valid", "int32"], ["float", "vector", 5, None, "step", np.int64(3)]),
    "steps_per_loop": (
        [None, 1, 2, 4, 8, 24, lambda step: 4],
        [0, -3, True, False, 2.0, "4", np.int64(4), [4]],
    ),
    "summary_interval": ([None, None, 8, 24, 6], [0, -3, True, 8.0, "8", np.int64(8)]),
    "summary_dir": ([None, "tmp", "pathlib"], [3, b"bytes", ["a"]]),
    "eval_summary_dir": ([None, "tmp", "pathlib"], [3, b"bytes", ["a"]]),
    "train_actions": (
        [None, [], [print], (print, print), _ITERATOR],
        [[1], {"a": print}, 5, "abc"],
    ),
    "eval_actions": ([None, [], [print], _ITERATOR], [[1], {"a": print}, 5, "abc"]),
    "preemption_signals": (
        [_MISSING, None, (), (signal.SIGTERM,), [signal.SIGUSR1, signal.SIGINT]],
        [(signal.SIGKILL,), "SIGTERM", [True], 15, [0], [15.0]],
    ),
    "summary_manager": ([None, "manager"], [object()]),
    "eval_summary_manager": ([None, "manager"], [object()]),
    "strategy": ([None, _NoScope(), _Scope()], [None]),
    "checkpoint_manager": ([None], [object(), "manager"]),
}


def _global_step(kind: Any) -> Any:
    if not isinstance(kind, str) or kind == "step":
        return kind
    return {
        "valid": looproto.create_global_step(),
        "int32": looproto.Variable(np.int32(0), trainable=False),
        "float": looproto.Variable(np.float32(0), trainable=False),
        "vector": looproto.Variable(np.zeros(2, np.int64), trainable=False),
    }[kind]


def _path(kind: Any, base: Path) -> Any:
    if kind == "tmp":
        return str(base / "summaries")
    if kind == "pathlib":
        return base / "summaries-pathlib"
    return kind


def _valid_positive(value: Any) -> bool:
    return _is_int(value) and value >= 1


def controller_oracle(kw: Mapping[str, Any], step_kind: Any) -> set[str]:
    """The invalid arguments of a `Controller(**kw)` call (empty: valid)."""
    invalid: set[str] = set()
    trainer, evaluator = kw["trainer"], kw["evaluator"]
    if trainer is None and evaluator is None:
        invalid |= {"trainer", "evaluator"}
    if trainer is not None and not callable(getattr(trainer, "train", None)):
        invalid.add("trainer")
    if evaluator is not None and not callable(getattr(evaluator, "evaluate", None)):
        invalid.add("evaluator")
    spl = kw["steps_per_loop"]
    spl_ok = spl is None or callable(spl) or _valid_positive(spl)
    if not spl_ok or (trainer is not None and spl is None):
        invalid.add("steps_per_loop")
    interval = kw["summary_interval"]
    if interval is not None:
        if not _valid_positive(interval):
            invalid.add("summary_interval")
        elif _valid_positive(spl) and interval % spl:
            invalid |= {"summary_interval", "steps_per_loop"}
    if step_kind not in ("valid", "int32"):
        invalid.add("global_step")
    for name in ("train_actions", "eval_actions"):
        value = kw[name]
        if value is None:
            continue
        iterable = hasattr(value, "__iter__") and not isinstance(value, (Mapping, str))
        if not iterable or not all(callable(a) for a in value):
            invalid.add(name)
    for name in ("summary_dir", "eval_summary_dir"):
        value = kw[name]
        if value is not None and not isinstance(value, (str, os.PathLike)):
            invalid.add(name)
    for name in ("summary_manager", "eval_summary_manager"):
        if kw[name] is not None and not isinstance(kw[name], looproto.SummaryManager):
            invalid.add(name)
    if kw["checkpoint_manager"] is not None:
        invalid.add("checkpoint_manager")  # only invalid ones are drawn
    sigs = kw.get("preemption_signals", _MISSING)
    if sigs is not _MISSING and sigs is not None:
        try:
            items = list(sigs) if not isinstance(sigs, (str, bytes)) else None
        except TypeError:
            items = None
        valid_numbers = {int(s) for s in signal.valid_signals()} - {
            int(signal.SIGKILL),
            int(signal.SIGSTOP),
        }
        if items is None or not all(_is_int(s) and s in valid_numbers for s in items):
            invalid.add("preemption_signals")
    return invalid


@settings(FAST, max_examples=300)
@given(
    **{
        name: _weighted(st.sampled_from(v), st.sampled_from(i))
        for name, (v, i) in CONTROLLER_ARGUMENTS.items()
    }
)
def test_controller_rejects_exactly_the_invalid_arguments(
    tmp_path: Path, step_kind: Any, **drawn: Any
) -> None:
    kw = dict(drawn)
    for name in ("summary_dir", "eval_summary_dir"):
        kw[name] = _path(kw[name], tmp_path)
    for name in ("summary_manager", "eval_summary_manager"):
        if kw[name] == "manager":
            kw[name] = looproto.SummaryManager(None)
    if kw["preemption_signals"] is _MISSING:
        del kw["preemption_signals"]
    for name in ("train_actions", "eval_actions"):
        if kw[name] is _ITERATOR:
            kw[name] = iter([print, print])  # fresh each time: an exhausted one is empty
    invalid = controller_oracle(kw, step_kind)
    controller = check(
        lambda: looproto.Controller(global_step=_global_step(step_kind), **kw), invalid
    )
    if controller is not None:
        controller.close()


# ----------------------------------------------------------------------------
# train / evaluate / train_and_evaluate arguments

step_values = st.one_of(
    st.integers(-4, 6), st.sampled_from([True, 2.5, "3", None, np.int64(2), np.int32(-1)])
)


def _steps_ok(value: Any, *, zero: bool, all_: bool) -> bool:
    if isinstance(value, np.integer):
        value = int(value)
    if not _is_int(value):
        return False
    return (all_ and value == -1) or value > 0 or (zero and value == 0)


@pytest.fixture(scope="module")
def trained_controller() -> Any:
    runner = TestRunner(epochs=None)
    controller = looproto.Controller(
        trainer=runner, evaluator=runner, global_step=runner.global_step, steps_per_loop=2
    )
    return runner, controller


@FAST
@given(steps=step_values)
def test_train_steps(trained_controller: Any, steps: Any) -> None:
    runner, controller = trained_controller
    runner.global_step.assign(0)
    # -1 ("until the data ends") is valid too, but this trainer's data never ends.
    hypothesis.assume(not (_steps_ok(steps, zero=False, all_=True) and int(steps) == -1))
    ok = _steps_ok(steps, zero=True, all_=False)
    check(lambda: controller.train(steps), set() if ok else {"steps"})
    if ok:
        assert int(runner.global_step) == int(steps)


@FAST
@given(steps=step_values)
def test_evaluate_steps(trained_controller: Any, steps: Any) -> None:
    _, controller = trained_controller
    ok = _steps_ok(steps, zero=False, all_=True)
    output = check(lambda: controller.evaluate(steps), set() if ok else {"steps"})
    if ok:
        assert "eval_loss" in output


@FAST
@given(train_steps=step_values, eval_steps=step_values, eval_interval=step_values)
def test_train_and_evaluate_arguments(
    trained_controller: Any, train_steps: Any, eval_steps: Any, eval_interval: Any
) -> None:
    runner, controller = trained_controller
    runner.global_step.assign(0)
    # -1 ("until the data ends") is valid too, but this trainer's data never ends.
    hypothesis.assume(
        not (_steps_ok(train_steps, zero=False, all_=True) and int(train_steps) == -1)
    )
    invalid = set()
    if not _steps_ok(train_steps, zero=True, all_=False):
        invalid.add("train_steps")
    if not _steps_ok(eval_steps, zero=False, all_=True):
        invalid.add("eval_steps")
    if eval_interval is not None and not _steps_ok(eval_interval, zero=False, all_=False):
        invalid.add("eval_interval")
    check(
        lambda: controller.train_and_evaluate(train_steps, eval_steps, eval_interval),
        invalid,
    )


# ----------------------------------------------------------------------------
# CheckpointManager arguments

counters = _weighted(
    st.sampled_from(["none", "variable", "int", "float_variable"]),
    st.sampled_from(["string", "object"]),
)
ints_or_junk = _weighted(
    st.none() | st.integers(1, 5) | st.just(np.int64(2)),
    st.sampled_from([0, -2, True, 1.5, "2", [1]]),
)


def _counter(kind: str) -> Any:
    return {
        "none": None,
        "variable": looproto.create_global_step(),
        "int": 3,
        "string": "3",
        "object": object(),
        "float_variable": looproto.Variable(np.float32(2.0)),
    }[kind]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    max_to_keep=ints_or_junk,
    checkpoint_interval=ints_or_junk,
    counter=counters,
    enable_async=_weighted(st.booleans(), st.sampled_from(["yes", 1, None])),
    init_fn=_weighted(st.sampled_from([None, print]), st.just(3)),
)
def test_checkpoint_manager_arguments(
    tmp_path: Path,
    max_to_keep: Any,
    checkpoint_interval: Any,
    counter: str,
    enable_async: Any,
    init_fn: Any,
) -> None:
    def positive(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0

    invalid = set()
    if max_to_keep is not None and not positive(max_to_keep):
        invalid.add("max_to_keep")
    if checkpoint_interval is not None:
        if not positive(checkpoint_interval):
            invalid.add("checkpoint_interval")
        elif counter == "none":
            invalid |= {"checkpoint_interval", "step_counter"}
    if counter in ("string", "object"):
        invalid.add("step_counter")
    if not isinstance(enable_async, bool):
        invalid.add("enable_async")
    if init_fn is not None and not callable(init_fn):
        invalid.add("init_fn")
    manager = check(
        lambda: CheckpointManager(
            tmp_path / "ckpt",
            {"w": looproto.Variable(np.zeros(2, np.float32))},
            max_to_keep=max_to_keep,
            checkpoint_interval=checkpoint_interval,
            step_counter=_counter(counter),
            enable_async=enable_async,
            init_fn=init_fn,
        ),
        invalid,
    )
    if manager is not None:
        manager.close()


# ----------------------------------------------------------------------------
# Run configs: `config.parse`

_TRAIN_KEYS = ("steps", "steps_per_loop", "summary_interval", "eval_interval", "eval_steps")
JUNK = [True, 1.5, "x", None, [1], {"a": 1}]
FACTORIES = (
    ["pkg.module:function", {"factory": "pkg.module:function", "learning_rate": 0.1}],
    [{"learning_rate": 0.1}, "no-colon", ":function", 3, {"factory": 3}],
)


@st.composite
def raw_configs(draw: Any) -> dict[str, Any]:
    """A config with each value valid nine times in ten, and some keys left out."""

    def value(valid: Any, invalid: list[Any]) -> Any:
        valid = valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(valid)
        return draw(_weighted(valid, st.sampled_from(invalid)))

    def present() -> bool:
        return bool(draw(st.booleans()))

    raw: dict[str, Any] = {}
    if present():
        raw["backend"] = value(["numpy"], ["nope", 3])
    if present():
        raw["model_dir"] = value(["runs/x"], [3, None])
    if present():
        raw["seed"] = value(st.integers(0, 5), [-2, *JUNK])
    for name in ("trainer", "evaluator"):
        if present():
            raw[name] = value(*FACTORIES)
    if present():
        train: dict[str, Any] = {}
        if draw(st.integers(0, 9)):
            train["steps"] = value(st.integers(1, 30) | st.just(-1), [0, -2, *JUNK])
        spl = value(st.integers(1, 10), [0, -1, *JUNK])
        if present():
            train["steps_per_loop"] = spl
        base = spl if "steps_per_loop" in train else 100
        multiples = st.integers(1, 3).map(lambda k: k * base) if _is_int(base) else st.none()
        if present():
            train["summary_interval"] = value(st.none() | multiples, [0, 7, *JUNK[:3]])
        if present():
            train["eval_interval"] = value(st.none() | st.integers(1, 30), [0, *JUNK[:3]])
        if present():
            train["eval_steps"] = value(st.integers(1, 10) | st.just(-1), [0, *JUNK])
        if draw(st.integers(0, 19)) == 0:
            train["unknwon"] = 1
        raw["train"] = train
    if present():
        evaluate: dict[str, Any] = {}
        if present():
            evaluate["steps"] = value(st.integers(1, 10) | st.just(-1), [0, -2, *JUNK])
        if present():
            timeouts = st.none() | st.floats(0, 5) | st.integers(0, 5)
            evaluate["timeout"] = value(timeouts, [-1, -0.5, True, "x", [1]])
        raw["evaluate"] = evaluate
    if present():
        checkpoint: dict[str, Any] = {}
        for key in ("enabled", "async_save"):
            if present():
                checkpoint[key] = value([True, False], [1, "yes", None, 1.5])
        for key in ("interval", "max_to_keep"):
            if present():
                checkpoint[key] = value(st.none() | st.integers(1, 10), [0, -1, *JUNK[:3]])
        raw["checkpoint"] = checkpoint
    if present():
        raw["backend_options"] = value([{"numpy": {"a": 1}}], [{"nope": {}}, {"numpy": 3}, 3])
    if draw(st.integers(0, 19)) == 0:
        raw["stpes"] = 1
    # A training config without an evaluator cannot have an eval_interval; keep most valid.
    orphan = "evaluator" not in raw and raw.get("train", {}).get("eval_interval") is not None
    if orphan and draw(st.integers(0, 3)):
        del raw["train"]["eval_interval"]
    return raw


def config_oracle(raw: Mapping[str, Any]) -> set[str]:
    """The invalid keys of a raw config (empty: valid)."""
    invalid: set[str] = set()
    known = {
        "backend",
        "model_dir",
        "seed",
        "trainer",
        "evaluator",
        "train",
        "evaluate",
        "checkpoint",
        "backend_options",
    }
    invalid |= {key for key in raw if key not in known}
    if "backend" in raw and raw["backend"] != "numpy":
        invalid.add("backend")
    if "model_dir" in raw and not isinstance(raw["model_dir"], str):
        invalid.add("model_dir")
    if "seed" in raw and not (_is_int(raw["seed"]) and raw["seed"] >= 0):
        invalid.add("seed")
    for name in ("trainer", "evaluator"):
        if name not in raw:
            continue
        value = raw[name]
        spec = value if isinstance(value, str) else None
        if isinstance(value, Mapping):
            spec = value.get("factory")
        if not isinstance(spec, str):
            invalid.add(name)
            continue
        module, sep, attribute = spec.partition(":")
        if not (module and sep and attribute):
            invalid.add(name)

    def int_key(table: Mapping[str, Any], key: str, prefix: str, *, minus_one: bool) -> None:
        if key not in table:
            return
        value = table[key]
        if value is None and key in ("summary_interval", "eval_interval", "interval"):
            return
        if value is None and key == "max_to_keep":
            return
        if not _is_int(value) or not (value >= 1 or (minus_one and value == -1)):
            invalid.add(f"{prefix}.{key}")

    train = raw.get("train")
    if train is not None:
        invalid |= {f"train.{k}" for k in train if k not in _TRAIN_KEYS}
        if "steps" not in train:
            invalid.add("train.steps")
        int_key(train, "steps", "train", minus_one=True)
        int_key(train, "steps_per_loop", "train", minus_one=False)
        int_key(train, "summary_interval", "train", minus_one=False)
        int_key(train, "eval_interval", "train", minus_one=False)
        int_key(train, "eval_steps", "train", minus_one=True)
        spl = train.get("steps_per_loop", 100)
        interval = train.get("summary_interval")
        if _is_int(interval) and _is_int(spl) and interval >= 1 and spl >= 1 and interval % spl:
            invalid |= {"train.summary_interval", "train.steps_per_loop"}
        if train.get("eval_interval") is not None and "evaluator" not in raw:
            invalid.add("train.eval_interval")
    evaluate = raw.get("evaluate", {})
    int_key(evaluate, "steps", "evaluate", minus_one=True)
    if "timeout" in evaluate:
        timeout = evaluate["timeout"]
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if timeout is not None and not (number and timeout >= 0):
            invalid.add("evaluate.timeout")
    checkpoint = raw.get("checkpoint", {})
    for key in ("enabled", "async_save"):
        if key in checkpoint and not isinstance(checkpoint[key], bool):
            invalid.add(f"checkpoint.{key}")
    int_key(checkpoint, "interval", "checkpoint", minus_one=False)
    int_key(checkpoint, "max_to_keep", "checkpoint", minus_one=False)
    options = raw.get("backend_options")
    if options is not None and options != {"numpy": {"a": 1}}:
        invalid.add("backend_options")
    return invalid


@settings(max_examples=400, deadline=None)
@given(raw=raw_configs())
def test_config_parse_rejects_exactly_the_invalid_values(raw: dict[str, Any]) -> None:
    invalid = config_oracle(raw)
    parsed = check(lambda: config.parse(raw, "run.toml"), invalid)
    if parsed is not None:
        assert isinstance(parsed, config.RunConfig)
    else:
        with pytest.raises(LooprotoError, match=r"^run\.toml: "):
            config.parse(raw, "run.toml")  # every message starts with the file


@settings(max_examples=200, deadline=None)
@given(item=st.text(max_size=30))
def test_set_overrides_never_raise_anything_but_a_config_error(item: str) -> None:
    raw: dict[str, Any] = {"train": {"steps": 10}, "seed": 0}
    messages: list[str] = []
    try:
        config.apply_overrides(raw, [item], "run.toml")
        config.parse(raw, "run.toml")
    except looproto.ConfigError as err:
        messages.append(str(err))
    # Anything else (a TypeError deep in parsing) fails the test by propagating.
    assert all(message.startswith("run.toml: ") for message in messages)


# ----------------------------------------------------------------------------
# Checkpoints: a hostile JSON item never gives anything but a looproto error

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def hostile_meta(draw: Any, good: dict[str, Any]) -> tuple[int, Any]:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return kind, draw(json_values)  # anything at all
    meta = json.loads(json.dumps(good))
    if kind == 1:  # one top-level value replaced
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(json_values)
    elif kind == 2:  # one entry of the tree or the objects replaced
        section = draw(st.sampled_from(["tree", "objects"]))
        key = draw(st.sampled_from(sorted(meta[section])))
        meta[section][key] = draw(json_values)
    else:  # a state replaced, checksum recomputed: a consistent but wrong item
        from looproto.checkpoint._state import json_crc32

        key = draw(st.sampled_from(sorted(meta["objects"])))
        meta["objects"][key]["state"] = draw(json_values)
        meta["crc32"] = json_crc32(meta)
    return kind, meta


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("good")
    with CheckpointManager(directory / "ckpt", _hostile_root()) as manager:
        manager.save(checkpoint_number=1)
    meta = json.loads((directory / "ckpt" / "1" / "meta" / "metadata").read_text())
    return directory / "ckpt", meta


def _hostile_root() -> dict[str, Any]:
    return {
        "w": looproto.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "rng": np.random.default_rng(3),
        "it": iter(ArrayDataset(np.arange(20), 4, epochs=None)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_hostile_json_item_gives_a_looproto_error_and_restores_nothing(
    tmp_path: Path, good_checkpoint: tuple[Path, dict[str, Any]], data: Any
) -> None:
    source, good = good_checkpoint
    kind, meta = data.draw(hostile_meta(good))
    directory = tmp_path / "ckpt"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(source, directory)
    (directory / "1" / "meta" / "metadata").write_text(json.dumps(meta))
    root = _hostile_root()
    root["w"].assign(np.full((2, 3), 9.0, np.float32))
    before = root["rng"].bit_generator.state
    with CheckpointManager(directory, root) as manager:
        try:
            manager.restore(1)
        except LooprotoError:
            np.testing.assert_array_equal(root["w"].value, np.full((2, 3), 9.0, np.float32))
            assert root["rng"].bit_generator.state == before
            assert root["it"].get_state() == {"epoch": 0, "batch": 0}
        else:  # only an unchanged item, or a consistent one the live objects accept
            assert meta == good or kind == 3
    try:
        read_metadata(directory)
    except LooprotoError:
        pass
