"""Orbit's `SummaryManagerInterface`: what the `Controller` needs of a summary manager."""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["SummaryManagerInterface"]


class SummaryManagerInterface(abc.ABC):
    """Writes nested dicts of values as summaries; each nested dict is a sub-directory.

    `looproto.orbit.Controller` takes any implementation. It enters
    `summary_writer().as_default()` around each inner loop (so `tf.summary` calls in the
    step write there) and each evaluation, and calls `write_summaries(output)` and
    `flush()` after it.
    """

    @abc.abstractmethod
    def flush(self) -> None:
        """Writes what was recorded so far to its files."""

    @abc.abstractmethod
    def summary_writer(self, relative_path: str = "") -> Any:
        """The `tf.summary` writer of the sub-directory `relative_path`."""

    @abc.abstractmethod
    def write_summaries(self, summary_dict: Any) -> None:
        """Writes every leaf of the (nested) dict; a nested dict is a sub-directory."""
