"""Ready-made actions: ConditionalAction, NewBestMetric, JSONPersistedValue, PeriodicAction."""

from __future__ import annotations

from typing import Any

import pytest

import looproto
from looproto.actions import ConditionalAction, JSONPersistedValue, NewBestMetric, PeriodicAction
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
