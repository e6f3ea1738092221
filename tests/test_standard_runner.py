"""StandardTrainer/StandardEvaluator: a port of Orbit's `standard_runner_test.py`, plus options."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import looproto
from looproto.data import ArrayDataset
from looproto.errors import ProtocolError


class CountingTrainer(looproto.StandardTrainer):
    def __init__(self, dataset: Any = None, options: Any = None) -> None:
        super().__init__(dataset if dataset is not None else range(1000), options)
        self.global_step = looproto.create_global_step()
        self.seen: list[int] = []

    def train_loop_begin(self) -> None:
        self.global_step.assign(0)

    def train_step(self, iterator: Any) -> None:
        self.seen.append(next(iterator))
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return {"steps": self.global_step.numpy()}


class CountingEvaluator(looproto.StandardEvaluator):
    def __init__(self, options: Any = None) -> None:
        super().__init__(range(10), options)
        self.count = 0

    def eval_begin(self) -> None:
        self.count = 0

    def eval_step(self, iterator: Any) -> None:
        next(iterator)
        self.count += 1

    def eval_end(self, *args: Any) -> Any:
        assert args == ()  # no state: eval_end() without arguments
        return {"count": self.count}


class SummingEvaluator(looproto.StandardEvaluator):
    """Reduces step outputs into a state dict (Orbit's aggregation fixture)."""

    def eval_begin(self) -> dict[str, list[float]]:
        return {"values": []}

    def eval_step(self, iterator: Any) -> float:
        return float(next(iterator))

    def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
        state["values"].append(step_outputs)
        return state

    def eval_end(self, *args: Any) -> Any:
        (state,) = args
        return {"sum": float(np.sum(state["values"]))}


def test_default_trainer_runs_num_steps_between_hooks():
    trainer = CountingTrainer()
    assert int(trainer.train(10)["steps"]) == 10
    assert trainer.seen == list(range(10))


def test_train_iterator_persists_across_calls():
    trainer = CountingTrainer()
    trainer.train(3)
    trainer.train(3)
    assert trainer.seen == list(range(6))


def test_setting_train_dataset_resets_the_iterator():
    trainer = CountingTrainer()
    trainer.train(3)
    trainer.train_dataset = range(100, 200)
    trainer.train(2)
    assert trainer.seen == [0, 1, 2, 100, 101]


def test_short_data_stops_the_loop_early():
    trainer = CountingTrainer(dataset=range(4))
    output = trainer.train(10)
    assert int(output["steps"]) == 4


def test_train_minus_one_runs_until_data_ends():
    trainer = CountingTrainer(dataset=ArrayDataset(np.arange(12), 3))
    assert int(trainer.train(-1)["steps"]) == 4


@pytest.mark.parametrize("compiled_loop", [True, False])
def test_default_evaluator_runs_num_steps(compiled_loop):
    options = looproto.StandardEvaluatorOptions(use_compiled_loop=compiled_loop)
    assert CountingEvaluator(options).evaluate(10) == {"count": 10}


def test_evaluator_reduces_outputs_through_state():
    assert SummingEvaluator(range(10)).evaluate(10) == {"sum": 45.0}


def test_evaluator_recreates_iterator_by_default():
    evaluator = SummingEvaluator(range(10))
    assert evaluator.evaluate(5) == {"sum": 10.0}
    assert evaluator.evaluate(5) == {"sum": 10.0}


def test_evaluator_can_keep_its_iterator():
    options = looproto.StandardEvaluatorOptions(recreate_iterator_for_each_eval=False)
    evaluator = SummingEvaluator(range(10), options)
    assert evaluator.evaluate(5) == {"sum": 10.0}
    assert evaluator.evaluate(5) == {"sum": 35.0}


def test_evaluate_minus_one_runs_until_data_ends():
    assert SummingEvaluator(range(7)).evaluate(-1) == {"sum": 21.0}


def test_nested_datasets_give_nested_iterators():
    class Pairs(looproto.StandardEvaluator):
        def eval_step(self, iterator: Any) -> Any:
            return next(iterator["a"]) + next(iterator["b"])

        def eval_begin(self) -> list[int]:
            return []

        def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
            return [*state, step_outputs]

        def eval_end(self, *args: Any) -> Any:
            return {"total": sum(args[0])}

    evaluator = Pairs({"a": range(5), "b": range(10, 15)})
    assert evaluator.evaluate(3) == {"total": (0 + 10) + (1 + 11) + (2 + 12)}


def test_options_are_frozen_and_accept_orbit_names():
    options = looproto.StandardTrainerOptions(use_tf_function=False, use_tf_while_loop=False)
    assert options.use_compiled_step is False
    assert options.use_compiled_loop is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.use_compiled_step = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "options_cls", [looproto.StandardTrainerOptions, looproto.StandardEvaluatorOptions]
)
def test_compiled_loop_needs_compiled_step(options_cls):
    with pytest.raises(
        looproto.ConfigError,
        match="`use_compiled_loop=True` and `use_compiled_step=False` is not supported",
    ):
        options_cls(use_compiled_step=False, use_compiled_loop=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_compiled_step": "yes"}, "use_compiled_step='yes'"),
        ({"backend": 3}, "backend=3"),
        ({"backend_options": [("jit", True)]}, "backend_options="),
    ],
)
def test_bad_options_raise_config_errors(kwargs, match):
    with pytest.raises(looproto.ConfigError, match=match):
        looproto.StandardTrainerOptions(**kwargs)


@pytest.mark.parametrize("num_steps", [0, -2, 2.5, True, "3"])
def test_bad_num_steps(num_steps):
    with pytest.raises(looproto.ConfigError, match="`num_steps` of `train\\(\\)`"):
        CountingTrainer().train(num_steps)


def test_non_mapping_output_is_a_protocol_error():
    class ReturnsScalar(CountingTrainer):
        def train_loop_end(self) -> Any:
            return 3

    with pytest.raises(looproto.ProtocolError, match="`train_loop_end` must return None or"):
        ReturnsScalar().train(1)


def test_unknown_backend_in_options_is_reported_at_first_train():
    trainer = CountingTrainer(options=looproto.StandardTrainerOptions(backend="nope"))
    with pytest.raises(looproto.ConfigError, match="Unknown backend 'nope'"):
        trainer.train(1)


def test_non_iterable_dataset_is_rejected():
    with pytest.raises(looproto.ConfigError, match="must be iterable"):
        CountingTrainer(dataset=3)


def test_trainer_and_evaluator_in_one_class_keep_their_state():
    class Both(looproto.StandardTrainer, looproto.StandardEvaluator):
        def __init__(self) -> None:
            looproto.StandardTrainer.__init__(self, range(100), name="both")
            looproto.StandardEvaluator.__init__(self, range(5))
            self.step = looproto.create_global_step()
            self.total = 0

        def train_step(self, iterator: Any) -> None:
            self.total += next(iterator)
            self.step.assign_add(1)

        def eval_step(self, iterator: Any) -> None:
            next(iterator)

    both = Both()
    both.train(4)
    both.evaluate(-1)
    assert both.name == "both" and both.total == 6 and int(both.step) == 4


def test_protocols_are_structural():
    class Duck:
        def train(self, num_steps: int) -> None:
            return None

        def evaluate(self, num_steps: int) -> None:
            return None

    assert isinstance(Duck(), looproto.Trainer)
    assert isinstance(Duck(), looproto.Evaluator)
    assert not isinstance(object(), looproto.Trainer)
    with pytest.raises(TypeError, match="abstract"):
        looproto.AbstractTrainer()  # type: ignore[abstract]


@pytest.mark.parametrize("returned", ["done", b"done", {"loss": 1.0, "note": "fine"}])
def test_a_train_step_returning_text_is_a_protocol_error(returned: Any) -> None:
    class Texting(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(train_dataset=None)
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> Any:
            self.global_step.assign_add(1)
            return returned

    with pytest.raises(ProtocolError, match=r"`.*Texting\.train_step` returned text"):
        Texting().train(3)
