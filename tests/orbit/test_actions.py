"""`looproto.orbit.actions`: exports, and the save on a preemption request."""

from __future__ import annotations

import os
from typing import Any

import pytest

tf = pytest.importorskip("tensorflow")

import looproto  # noqa: E402
from looproto import orbit, preemption  # noqa: E402
from looproto.orbit.actions import export_saved_model  # noqa: E402


def test_conditional_and_best_metric_are_looproto_s() -> None:
    assert orbit.actions.ConditionalAction is looproto.actions.ConditionalAction
    assert orbit.actions.NewBestMetric is looproto.actions.NewBestMetric
    assert export_saved_model.safe_normpath("gs://a//b/../c") == "gs://a/c"


def test_export_saved_model_keeps_the_newest(tmp_path: Any) -> None:
    class Model(tf.Module):
        def __init__(self) -> None:
            self.value = tf.Variable(1.0)

        @tf.function(input_signature=[])
        def __call__(self) -> Any:
            return self.value

    model = Model()
    manager = orbit.actions.ExportFileManager(str(tmp_path / "export"), max_to_keep=2)
    export = orbit.actions.ExportSavedModel(model, manager, signatures=model.__call__)
    for value in (1.0, 2.0, 3.0):
        model.value.assign(value)
        export({})
    assert [os.path.basename(p) for p in manager.managed_files] == ["export-1", "export-2"]
    assert float(tf.saved_model.load(manager.managed_files[-1])()) == 3.0


def test_save_checkpoint_if_preempted_with_a_tf_checkpoint_manager(tmp_path: Any) -> None:
    step = orbit.utils.create_global_step()
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step), str(tmp_path), max_to_keep=None
    )
    action = orbit.actions.SaveCheckpointIfPreempted(
        None, manager, checkpoint_number=step, keep_running_after_save=True
    )
    action({})
    assert manager.checkpoints == []  # no request, no save
    step.assign(7)
    preemption.request()
    try:
        action({})
    finally:
        preemption.clear()
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-7"]
