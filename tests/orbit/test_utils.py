"""`looproto.orbit.utils`: the global step, summaries, loops, epochs, datasets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto.orbit import utils  # noqa: E402
from looproto.testing import read_events  # noqa: E402


def test_create_global_step_is_orbit_s_tf_variable() -> None:
    step = utils.create_global_step()
    assert isinstance(step, tf.Variable)
    assert (step.name, step.dtype, step.trainable) == ("global_step:0", tf.int64, False)
    assert step.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA


def test_get_value() -> None:
    assert utils.get_value(tf.constant(3)) == 3 and isinstance(
        utils.get_value(tf.constant(3)), np.integer
    )
    marker = object()
    assert utils.get_value(marker) is marker


def test_summary_manager_writes_nested_dicts_with_summary_fn(tmp_path: Any) -> None:
    step = utils.create_global_step()
    manager = utils.SummaryManager(str(tmp_path), tf.summary.scalar, global_step=step)
    step.assign(3)
    manager.write_summaries({"loss": 0.5, "eval": {"accuracy": np.float32(0.75)}})
    manager.flush()
    events = read_events(tmp_path)
    assert events["."]["loss"] == [(3, 0.5)]
    assert events["eval"]["accuracy"] == [(3, 0.75)]
    disabled = utils.SummaryManager(None, tf.summary.scalar)
    disabled.write_summaries({"loss": 1.0})
    assert not disabled.enabled
    with pytest.raises(looproto.ConfigError, match="summary_fn"):
        utils.SummaryManager(str(tmp_path), None)  # type: ignore[arg-type]


def test_epoch_helper_with_any_global_step() -> None:
    step = looproto.create_global_step()
    helper = utils.EpochHelper(epoch_steps=4, global_step=step)
    with pytest.raises(looproto.ConfigError, match="inside an epoch"):
        helper.epoch_end()
    assert helper.epoch_begin() and not helper.epoch_begin()
    step.assign_add(3)
    assert helper.batch_index == 3 and not helper.epoch_end()
    step.assign_add(1)
    assert helper.epoch_end() and helper.current_epoch == 0
    assert helper.epoch_begin() and helper.current_epoch == 1


def test_loop_fns() -> None:
    loop = utils.create_loop_fn(lambda iterator: int(next(iterator)))
    data = tf.data.Dataset.range(5)
    assert loop(iter(data), -1, 0, lambda state, x: state + x) == 10  # until the data ends
    assert loop(iter(data), tf.constant(2), 0, lambda state, x: state + x) == 1

    total = tf.Variable(0, dtype=tf.int64)
    body = utils.create_tf_while_loop_fn(lambda iterator: total.assign_add(next(iterator)))
    with pytest.raises(looproto.ConfigError, match=r"should be a `tf\.Tensor`"):
        body(iter(data), 3)
    tf.function(body)(iter(data), tf.constant(4))
    assert int(total.numpy()) == 0 + 1 + 2 + 3

    from looproto.orbit.utils.loop_fns import create_tf_while_loop_fn_with_state

    gather = create_tf_while_loop_fn_with_state(lambda iterator: tf.reshape(next(iterator), [1]))
    state = tf.function(gather)(
        iter(data), tf.constant(3), tf.zeros([0], tf.int64), lambda s, x: tf.concat([s, x], 0)
    )
    assert state.numpy().tolist() == [0, 1, 2]


def test_optional_summaries_function_runs_one_step_with_summaries(tmp_path: Any) -> None:
    step = utils.create_global_step()

    def step_fn(iterator: Any) -> None:
        tf.summary.scalar("x", tf.cast(next(iterator), tf.float32), step=step)
        step.assign_add(1)

    # As `orbit.StandardTrainer(use_tpu_summary_optimization=True)` builds it in Orbit.
    loop = utils.LoopFnWithSummaries(utils.create_tf_while_loop_fn(step_fn))
    iterator = iter(tf.data.Dataset.range(100))
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        loop(iterator, tf.constant(5))
        with tf.summary.record_if(False):
            loop(iterator, tf.constant(5))
    writer.close()
    assert int(step.numpy()) == 10
    assert [s for s, _ in read_events(tmp_path)["."]["x"]] == [0]


def test_make_distributed_dataset_passes_the_input_context() -> None:
    contexts = []

    def dataset_fn(input_context: Any = None) -> Any:
        contexts.append(input_context)
        return tf.data.Dataset.range(3)

    dataset = utils.make_distributed_dataset(None, dataset_fn)
    assert [int(x) for x in dataset] == [0, 1, 2]
    assert isinstance(contexts[0], tf.distribute.InputContext)
    with pytest.raises(looproto.ConfigError, match="dataset_or_fn"):
        utils.make_distributed_dataset(None, 3)
