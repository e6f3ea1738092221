"""Orbit's `SummaryManager`: `tf.summary` writers, one per sub-directory, and `summary_fn`.

Summaries go through TensorFlow's own writers (`tf.summary.create_file_writer`), so the
values the `Controller` writes and the `tf.summary` calls made inside a step land in
the same event file of a directory. (Core `looproto.SummaryManager` writes with
tensorboardX and needs no TensorFlow.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from looproto.errors import ConfigError, value_repr
from looproto.module import Variable, read_int
from looproto.orbit.utils.summary_manager_interface import SummaryManagerInterface

__all__ = ["SummaryManager"]


class SummaryManager(SummaryManagerInterface):
    """Writes nested dicts with `summary_fn` into `tf.summary` writers under `summary_dir`.

    Args:
        summary_dir: The root directory, or None: then every method does nothing (the
            writers are `tf.summary.create_noop_writer()`s).
        summary_fn: Called as `summary_fn(name, value, step=step)` for every leaf,
            inside the leaf's writer (`tf.summary.scalar`, say).
        global_step: The step of the values (a `tf.Variable` is read at each write;
            any scalar integer variable works). Default: `tf.summary`'s default step.
    """

    def __init__(
        self,
        summary_dir: str | os.PathLike[str] | None,
        summary_fn: Callable[..., Any],
        global_step: Any = None,
    ) -> None:
        if summary_dir is not None and not isinstance(summary_dir, (str, os.PathLike)):
            raise ConfigError(
                "`summary_dir` must be a path or None; received "
                f"summary_dir={value_repr(summary_dir)}."
            )
        if not callable(summary_fn):
            raise ConfigError(
                "`summary_fn` must be callable as `summary_fn(name, value, step=step)` "
                f"(e.g. `tf.summary.scalar`); received summary_fn={value_repr(summary_fn)}."
            )
        self._enabled = summary_dir is not None
        self._summary_dir = None if summary_dir is None else os.fspath(summary_dir)
        self._summary_fn = summary_fn
        self._summary_writers: dict[str, Any] = {}
        self._global_step = (
            tf.summary.experimental.get_step() if global_step is None else global_step
        )

    @property
    def enabled(self) -> bool:
        """Whether summaries are written (False when `summary_dir` is None)."""
        return self._enabled

    @property
    def summary_dir(self) -> str | None:
        """The root directory, or None."""
        return self._summary_dir

    def summary_writer(self, relative_path: str = "") -> Any:
        """The writer of `<summary_dir>/<relative_path>`, created on first use."""
        writer = self._summary_writers.get(relative_path)
        if writer is None:
            if self._enabled:
                assert self._summary_dir is not None
                path = os.path.join(self._summary_dir, relative_path)
                writer = tf.summary.create_file_writer(path)
            else:
                writer = tf.summary.create_noop_writer()
            self._summary_writers[relative_path] = writer
        return writer

    def flush(self) -> None:
        """Flushes every writer."""
        if self._enabled:
            for writer in self._summary_writers.values():
                writer.flush()

    def write_summaries(self, summary_dict: Mapping[str, Any], step: Any = None) -> None:
        """Writes every leaf with `summary_fn`; a nested dict is a sub-directory.

        Args:
            summary_dict: The values.
            step: Their step; default the `global_step` given to the manager.
        """
        if not self._enabled:
            return
        step = self._global_step if step is None else step
        if isinstance(step, Variable) or (step is not None and not _is_tf_step(step)):
            step = read_int(step)
        self._write(summary_dict, "", step)

    def _write(self, summary_dict: Mapping[str, Any], relative_path: str, step: Any) -> None:
        for name, value in summary_dict.items():
            if isinstance(value, Mapping):
                self._write(value, os.path.join(relative_path, name), step)
            else:
                with self.summary_writer(relative_path).as_default():
                    self._summary_fn(name, value, step=step)

    def sync(self) -> None:
        """Flushes every writer (what `looproto.Controller` calls after a checkpoint)."""
        self.flush()

    def close(self) -> None:
        """Flushes and closes every writer; a later write opens new ones."""
        writers, self._summary_writers = self._summary_writers, {}
        for writer in writers.values():
            writer.close()

    def __repr__(self) -> str:
        return f"SummaryManager(summary_dir={self._summary_dir!r})"


def _is_tf_step(step: Any) -> bool:
    return isinstance(step, (tf.Tensor, tf.Variable))
