"""Orbit's `orbit.utils`: global step, summaries, loops, epochs, distributed datasets."""

from looproto.orbit.utils.common import create_global_step as create_global_step
from looproto.orbit.utils.common import get_value as get_value
from looproto.orbit.utils.common import make_distributed_dataset as make_distributed_dataset
from looproto.orbit.utils.epoch_helper import EpochHelper as EpochHelper
from looproto.orbit.utils.loop_fns import LoopFnWithSummaries as LoopFnWithSummaries
from looproto.orbit.utils.loop_fns import create_loop_fn as create_loop_fn
from looproto.orbit.utils.loop_fns import create_tf_while_loop_fn as create_tf_while_loop_fn
from looproto.orbit.utils.summary_manager import SummaryManager as SummaryManager
from looproto.orbit.utils.summary_manager_interface import (
    SummaryManagerInterface as SummaryManagerInterface,
)
from looproto.orbit.utils.tpu_summaries import (
    OptionalSummariesFunction as OptionalSummariesFunction,
)

__all__ = [
    "EpochHelper",
    "LoopFnWithSummaries",
    "OptionalSummariesFunction",
    "SummaryManager",
    "SummaryManagerInterface",
    "create_global_step",
    "create_loop_fn",
    "create_tf_while_loop_fn",
    "get_value",
    "make_distributed_dataset",
]
