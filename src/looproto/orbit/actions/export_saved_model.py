"""Orbit's `ExportSavedModel` action and the `ExportFileManager` that names and prunes exports.

Files are handled through `tf.io.gfile`, so `gs://` and the other file systems
TensorFlow knows work as local paths do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from looproto.errors import ConfigError, value_repr

__all__ = ["ExportFileManager", "ExportSavedModel", "safe_normpath"]

_GCS = "gs://"


def safe_normpath(path: str) -> str:
    """`os.path.normpath(path)`, keeping the `//` of a leading `gs://`."""
    if path.startswith(_GCS):
        return _GCS + os.path.normpath(path[len(_GCS) :])
    return os.path.normpath(path)


def _id_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _numbered(base_name: str) -> list[str]:
    """The paths `{base_name}-<integer>` on disk, by increasing integer."""
    pattern = re.compile(rf"{re.escape(base_name)}-\d+")
    names = [n for n in tf.io.gfile.glob(f"{base_name}-*") if pattern.fullmatch(n)]
    return sorted(names, key=_id_of)


class _NextFreeId:
    """Counts up from one past the highest id on disk (0 when there is none)."""

    def __init__(self, base_name: str) -> None:
        existing = _numbered(base_name)
        self.value = _id_of(existing[-1]) + 1 if existing else 0

    def __call__(self) -> int:
        value = self.value
        self.value += 1
        return value


class ExportFileManager:
    """Names exports `{base_name}-{id}` and deletes all but the newest `max_to_keep`.

    Subclass it for other naming or retention rules.

    Args:
        base_name: The path every managed name starts with (normalised).
        max_to_keep: How many managed files `clean_up` keeps, those of the highest ids;
            a negative number keeps all.
        next_id_fn: Returns the id of the next name (e.g. `global_step.numpy`);
            default a counter from one past the highest id on disk.
        subdirectory: Manage `{base_name}-{id}/{subdirectory}` instead; `clean_up`
            then deletes only that subdirectory.
    """

    def __init__(
        self,
        base_name: str,
        max_to_keep: int = 5,
        next_id_fn: Callable[[], int] | None = None,
        subdirectory: str | None = None,
    ) -> None:
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError(
                f"`base_name` must be a non-empty path; received {value_repr(base_name)}."
            )
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int):
            raise ConfigError(
                f"`max_to_keep` must be an int; received max_to_keep={value_repr(max_to_keep)}."
            )
        self._base_name = safe_normpath(base_name)
        self._max_to_keep = max_to_keep
        self._next_id_fn = next_id_fn or _NextFreeId(self._base_name)
        self._subdirectory = subdirectory or ""

    @property
    def managed_files(self) -> list[str]:
        """The existing managed paths, by increasing id."""
        paths = (
            safe_normpath(os.path.join(name, self._subdirectory))
            for name in _numbered(self._base_name)
        )
        return [path for path in paths if tf.io.gfile.exists(path)]

    def clean_up(self) -> None:
        """Deletes the managed files but the `max_to_keep` of the highest ids."""
        if self._max_to_keep < 0:
            return
        # `[:-0]` is empty: `max_to_keep=0` deletes nothing, as in Orbit.
        for path in self.managed_files[: -self._max_to_keep]:
            tf.io.gfile.rmtree(path)

    def next_name(self) -> str:
        """The path of the next export: `{base_name}-{next_id_fn()}[/subdirectory]`."""
        return safe_normpath(
            os.path.join(f"{self._base_name}-{self._next_id_fn()}", self._subdirectory)
        )


class ExportSavedModel:
    """An action that exports `model` as a SavedModel to the file manager's next name.

    After each export the file manager's `clean_up` prunes old ones.

    Args:
        model: The `tf.Module` (or Keras model) to export.
        file_manager: Names and prunes the exports.
        signatures: Passed to `tf.saved_model.save`.
        options: A `tf.saved_model.SaveOptions`, passed on.
    """

    def __init__(
        self,
        model: Any,
        file_manager: ExportFileManager,
        signatures: Any,
        options: Any = None,
    ) -> None:
        self.model = model
        self.file_manager = file_manager
        self.signatures = signatures
        self.options = options

    def __call__(self, output: Any) -> None:
        """Exports (the output is not used)."""
        export_dir = self.file_manager.next_name()
        tf.saved_model.save(self.model, export_dir, self.signatures, self.options)
        self.file_manager.clean_up()
