"""Orbit's `SaveCheckpointIfPreempted`, on looproto's preemption handling.

Orbit's action asks TensorFlow's `PreemptionCheckpointHandler` (which watches the
cluster through its resolver); this one asks `looproto.preemption`, where the
`Controller` turns SIGTERM/SIGINT during training into a request. The arguments are
Orbit's; `cluster_resolver` is accepted and not used.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from looproto import actions
from looproto.backends.tensorflow import TfCheckpointManager

__all__ = ["SaveCheckpointIfPreempted"]


class SaveCheckpointIfPreempted(actions.SaveCheckpointIfPreempted):
    """When a stop was requested, saves a checkpoint, then stops (or keeps running).

    Args:
        cluster_resolver: Orbit's cluster resolver (not used: see the module docstring).
        checkpoint_manager: A `tf.train.CheckpointManager`, or a looproto one.
        checkpoint_number: The number to save under (a variable, read when saving);
            default the manager's step counter.
        keep_running_after_save: Keep training after saving instead of raising
            `looproto.Preempted`.
    """

    def __init__(
        self,
        cluster_resolver: Any,
        checkpoint_manager: Any,
        checkpoint_number: Any = None,
        keep_running_after_save: bool | None = False,
    ) -> None:
        if isinstance(checkpoint_manager, tf.train.CheckpointManager):
            checkpoint_manager = TfCheckpointManager(checkpoint_manager)
        self.cluster_resolver = cluster_resolver
        super().__init__(
            checkpoint_manager,
            checkpoint_number=checkpoint_number,
            keep_running_after_save=bool(keep_running_after_save),
        )
