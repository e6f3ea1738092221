"""Ready-made actions: ConditionalAction, NewBestMetric, JSONPersistedValue, PeriodicAction,
SaveCheckpointIfPreempted."""

from __future__ import annotations

from typing import Any

import pytest

import looproto
from looproto.actions import (
    ConditionalAction,
    JSONPersistedValue,
    NewBestMetric,
    PeriodicAction,
    SaveCheckpointIfPreempted,
)
from tests.helpers import TestRunner


def test_conditional_action_runs_only_when_condition_holds():
    calls: list[Any] = []
    action = ConditionalAction(lambda out: out["value"], [calls.append, calls.append])
    action({"value": False})
    assert calls == []
    action({"value": True})
    assert calls == [{"value": True}, {"value": True}]


def test_new_best_metric_higher_is_better():
    best = NewBestMetric(lambda out: out["value"])
    assert best.test({"value": 0.0})
    assert best.commit({"value": 0.0})
    assert not best.test({"value": 0.0})
    assert best.test({"value": 1.0})


def test_new_best_metric_lower_is_better():
    best = NewBestMetric("value", higher_is_better=False)
    assert best.commit({"value": 0.0})
    assert not best.test({"value": 0.0})
    assert best.test({"value": -1.0})


def test_new_best_metric_persists_across_instances(tmp_path):
    filename = str(tmp_path / "best.json")
    (tmp_path / "best.json").write_text("")
    in_memory = NewBestMetric("value", filename=filename, write_metric=False)
    assert in_memory.commit({"value": 0.0})
    assert (tmp_path / "best.json").read_text() == ""
    written = NewBestMetric("value", filename=filename)
    assert written.best_value < 0.0
    assert written.commit({"value": 5.0})
    assert NewBestMetric("value", filename=filename).best_value == 5.0


def test_new_best_metric_names_a_missing_key():
    with pytest.raises(looproto.ConfigError, match="'accuracy' is not in the output"):
        NewBestMetric("accuracy")({"loss": 1.0})


def test_json_persisted_value(tmp_path):
    filename = str(tmp_path / "sub" / "value")
    JSONPersistedValue({"a": 1}, filename, write_value=False)
    assert not (tmp_path / "sub").exists()
    value = JSONPersistedValue({"a": 1, "b": 2}, filename)
    assert JSONPersistedValue("ignored", filename).read() == {"a": 1, "b": 2}
    value.write([1, 2, 3])
    frozen = JSONPersistedValue("ignored", filename, write_value=False)
    frozen.write("not persisted")
    assert JSONPersistedValue(None, filename).read() == [1, 2, 3]


def test_periodic_action_fires_on_boundary_crossings_with_any_steps_per_loop():
    fired_at: list[int] = []
    runner = TestRunner()
    action = PeriodicAction(
        lambda out: fired_at.append(int(runner.global_step)),
        runner.global_step,
        every_n_steps=5,
    )
    looproto.Controller(
        trainer=runner, global_step=runner.global_step, steps_per_loop=3, train_actions=[action]
    ).train(steps=21)
    # Loops end at 3, 6, 9, 12, 15, 18, 21: boundaries 5, 10, 15, 20 are crossed at 6, 12, 15, 21.
    assert fired_at == [6, 12, 15, 21]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "Pass `every_n_steps`, `every_n_seconds`, or both"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"every_n_seconds": -1}, "every_n_seconds=-1"),
    ],
)
def test_periodic_action_rejects_bad_intervals(kwargs, match):
    with pytest.raises(looproto.ConfigError, match=match):
        PeriodicAction(print, looproto.create_global_step(), **kwargs)


class _RequestAt(TestRunner):
    __test__ = False

    def __init__(self, step: int) -> None:
        super().__init__()
        self.request_step = step

    def train_step(self, iterator: Any) -> None:
        super().train_step(iterator)
        if int(self.global_step) == self.request_step:
            looproto.preemption.request()


def _manager(tmp_path: Any, runner: TestRunner) -> looproto.CheckpointManager:
    return looproto.CheckpointManager(tmp_path, runner, step_counter=runner.global_step)


def test_save_checkpoint_if_preempted_saves_then_stops(tmp_path):
    runner = _RequestAt(5)
    manager = _manager(tmp_path, runner)
    action = SaveCheckpointIfPreempted(manager)
    # No handlers of the Controller's own: the action alone acts on the request.
    controller = looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=3,
        train_actions=[action],
        preemption_signals=None,
    )
    with pytest.raises(looproto.preemption.Preempted) as info:
        controller.train(steps=30)
    assert (info.value.step, info.value.checkpoint) == (6, str(tmp_path / "6"))
    assert info.value.code == 75
    assert manager.checkpoints == [str(tmp_path / "6")]
    assert not looproto.preemption.requested()


def test_save_checkpoint_if_preempted_can_keep_running(tmp_path):
    runner = _RequestAt(5)
    manager = _manager(tmp_path, runner)
    action = SaveCheckpointIfPreempted(
        manager, checkpoint_number=runner.global_step, keep_running_after_save=True
    )
    looproto.Controller(
        trainer=runner,
        global_step=runner.global_step,
        steps_per_loop=3,
        train_actions=[action],
        preemption_signals=None,
    ).train(steps=12)
    assert int(runner.global_step) == 12
    assert manager.checkpoints == [str(tmp_path / "6")]  # once, at the request


def test_save_checkpoint_if_preempted_does_nothing_without_a_request(tmp_path):
    runner = TestRunner()
    manager = _manager(tmp_path, runner)
    SaveCheckpointIfPreempted(manager)({})
    assert manager.checkpoints == []


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((object(),), "`checkpoint_manager` must have"),
        ((None,), "`checkpoint_manager` must have"),
    ],
)
def test_save_checkpoint_if_preempted_rejects_bad_arguments(args, match):
    with pytest.raises(looproto.LooprotoError, match=match):
        SaveCheckpointIfPreempted(*args)


def test_save_checkpoint_if_preempted_keep_running_must_be_bool(tmp_path):
    manager = _manager(tmp_path, TestRunner())
    with pytest.raises(looproto.ConfigError, match="`keep_running_after_save`"):
        SaveCheckpointIfPreempted(manager, keep_running_after_save="yes")
