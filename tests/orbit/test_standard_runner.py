"""`looproto.orbit.StandardTrainer`/`StandardEvaluator`: Orbit's surface on looproto's loops."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto import orbit  # noqa: E402
from looproto.backends.tensorflow import TensorflowLoop  # noqa: E402


class Summing(orbit.StandardTrainer, orbit.StandardEvaluator):
    """Holds no variable of its own: its steps are TensorFlow code (Orbit's default)."""

    __test__ = False

    def __init__(self, trainer_options: Any = None, evaluator_options: Any = None) -> None:
        self.seen: list[Any] = []
        orbit.StandardTrainer.__init__(self, tf.data.Dataset.range(10).repeat(), trainer_options)
        orbit.StandardEvaluator.__init__(self, tf.data.Dataset.range(10), evaluator_options)

    def train_step(self, iterator: Any) -> None:
        next(iterator)

    def train_loop_end(self) -> Any:
        return 7  # not a dict: passed through as Orbit does

    def eval_begin(self) -> Any:
        return tf.constant([0], tf.int64)

    def eval_step(self, iterator: Any) -> Any:
        return tf.reshape(next(iterator), [1])

    def eval_reduce(self, state: Any, step_outputs: Any) -> Any:
        return tf.concat([state, step_outputs], 0)

    def eval_end(self, state: Any) -> Any:
        return tf.reduce_sum(state)


def test_tensor_num_steps_and_outputs_passed_through() -> None:
    runner = Summing()
    assert runner.train(tf.constant(3)) == 7
    assert int(runner.evaluate(tf.constant(4))) == 0 + 1 + 2 + 3
    assert int(runner.evaluate(-1)) == sum(range(10))
    # Orbit's code is TensorFlow code: a runner holding no variable gets that backend.
    assert isinstance(runner._train_loop_fn, TensorflowLoop)


def test_options_are_orbit_s_fields_first_and_frozen() -> None:
    options = orbit.StandardTrainerOptions(False, False, False)
    assert (options.use_tf_function, options.use_tf_while_loop) == (False, False)
    assert [f.name for f in dataclasses.fields(orbit.StandardEvaluatorOptions)][:3] == [
        "use_tf_function",
        "use_tf_while_loop",
        "recreate_iterator_for_each_eval",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.use_tf_function = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (orbit.StandardTrainerOptions(use_tf_function=False), "use_tf_while_loop=True"),
        (
            orbit.StandardTrainerOptions(
                use_tf_while_loop=False, use_tpu_summary_optimization=True
            ),
            "use_tpu_summary_optimization=True",
        ),
        (looproto.StandardTrainerOptions(), "looproto.orbit.StandardTrainerOptions"),
    ],
)
def test_unsupported_options_are_config_errors(options: Any, match: str) -> None:
    with pytest.raises(looproto.ConfigError, match=match):
        Summing(trainer_options=options)


def test_the_backend_option_picks_the_loop() -> None:
    class Ported(orbit.StandardTrainer):
        def __init__(self, backend: str | None) -> None:
            super().__init__(
                looproto.data.ArrayDataset({"x": np.arange(8.0)}, batch_size=2),
                options=orbit.StandardTrainerOptions(backend=backend),
            )
            self.total = looproto.Variable(np.float64(0))

        def train_step(self, iterator: Any) -> None:
            self.total.assign_add(next(iterator)["x"].sum())

    ported = Ported(None)  # NumPy Variables, NumPy code: the NumPy backend
    ported.train(4)
    assert float(ported.total.numpy()) == sum(range(8))
    assert not isinstance(ported._train_loop_fn, TensorflowLoop)
