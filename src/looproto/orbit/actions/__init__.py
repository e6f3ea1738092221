"""Orbit's `orbit.actions`: callables the `Controller` runs on each loop's output.

`ConditionalAction`, `NewBestMetric` and `JSONPersistedValue` are looproto's own
(`looproto.actions`), which have Orbit's arguments; `ExportSavedModel` and
`ExportFileManager` export SavedModels; `SaveCheckpointIfPreempted` saves when
looproto's preemption handling says the job is being stopped.
"""

from looproto.orbit.actions.conditional_action import ConditionalAction as ConditionalAction
from looproto.orbit.actions.export_saved_model import ExportFileManager as ExportFileManager
from looproto.orbit.actions.export_saved_model import ExportSavedModel as ExportSavedModel
from looproto.orbit.actions.new_best_metric import JSONPersistedValue as JSONPersistedValue
from looproto.orbit.actions.new_best_metric import NewBestMetric as NewBestMetric
from looproto.orbit.actions.save_checkpoint_if_preempted import (
    SaveCheckpointIfPreempted as SaveCheckpointIfPreempted,
)

__all__ = [
    "ConditionalAction",
    "ExportFileManager",
    "ExportSavedModel",
    "JSONPersistedValue",
    "NewBestMetric",
    "SaveCheckpointIfPreempted",
]
