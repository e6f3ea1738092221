"""What can go wrong around a run, and how the `looproto` command reports it.

The exit status of each kind of error, the one line printed for it, the check that a
factory returned what its key promises, and the check of the model directory that runs
before anything is built or trained. See
`looproto.run.cli` for the table of statuses.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from typing import Any

from looproto.errors import (
    ConfigError,
    DistributedError,
    LooprotoError,
    NonFiniteError,
    StorageError,
    value_repr,
)
from looproto.preemption import Preempted
from looproto.run.config import RunConfig

__all__ = [
    "EXIT_DISTRIBUTED",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "StoppedInStartUp",
    "check_built",
    "check_model_dir",
    "exit_status",
    "one_line",
    "quiet_background_tracebacks",
]

EXIT_USAGE = 2
EXIT_DISTRIBUTED = 3
EXIT_STORAGE = 4
EXIT_DIVERGED = 5
EXIT_INTERRUPTED = 130


def exit_status(err: BaseException) -> int | None:
    """The documented exit status of an error, or None for an unexpected one (a bug)."""
    if isinstance(err, DistributedError):
        return EXIT_DISTRIBUTED
    if isinstance(err, NonFiniteError):
        return EXIT_DIVERGED
    if isinstance(err, StorageError):
        return EXIT_STORAGE
    if isinstance(err, LooprotoError):
        return EXIT_USAGE
    if isinstance(err, OSError):  # the environment refused something (a disk, a path)
        return EXIT_STORAGE
    return None


def one_line(err: BaseException) -> str:
    """The message printed for `err` (an `OSError`'s with its file and errno name).

    looproto's own messages are one line, except those that list details after it
    (every difference between a checkpoint and the live tree).
    """
    if isinstance(err, OSError) and not isinstance(err, LooprotoError):
        name = f": {err.filename}" if err.filename else ""
        code = errno.errorcode.get(err.errno or 0, "")
        return f"{err.strerror or err}{name}" + (f" ({code})" if code else "")
    return str(err)


def check_built(obj: Any, key: str, method: str, config: RunConfig) -> None:
    """What a factory returned is a trainer (evaluator): blame the factory that made it."""
    if callable(getattr(obj, method, None)):
        return
    spec = getattr(config, key).factory
    what = "None" if obj is None else f"{value_repr(obj)} of type {type(obj).__name__}"
    raise ConfigError(
        f"{config.source}: `{key}.factory` = {spec} returned {what}; expected a {key} (an "
        f"object with a `{method}(num_steps)` method and a `global_step`)."
    )


def check_model_dir(config: RunConfig, *, train: bool) -> None:
    """Raises `StorageError` unless the directories the command writes can be written.

    Checked before anything is built or trained: a model directory that is a file, a
    dangling symbolic link, read-only or on a full disk fails here with one line.
    """
    directories = [os.path.join(config.summary_dir, "eval")]
    if train:
        directories.append(os.path.join(config.summary_dir, "train"))
        if config.checkpoint.enabled:
            directories.append(config.checkpoint_dir)
    for directory in directories:
        _check_writable(directory)


def _check_writable(directory: str) -> None:
    # Each level: a dangling link or a file on the way is named as such.
    path = os.path.abspath(directory)
    parts = []
    while True:
        parts.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for level in reversed(parts):
        if os.path.islink(level) and not os.path.exists(level):
            raise StorageError(
                f"{level} is a dangling symbolic link (to {os.readlink(level)!r}); expected "
                "a directory."
            )
        if os.path.exists(level) and not os.path.isdir(level):
            raise StorageError(f"{level} is a file; expected a directory.")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".looproto-probe-", dir=directory)
        try:
            # One byte, made durable: a full disk refuses it.
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, "")
        raise StorageError(
            f"Cannot write in {os.path.abspath(directory)}: {err.strerror or err}"
            + (f" ({code})." if code else ".")
        ) from err


class StoppedInStartUp(Preempted):
    """A signal came before training began: nothing to save; run again to start."""

    def __init__(self, cause: str) -> None:
        super().__init__(-1)
        self.cause = cause

    def __str__(self) -> str:
        return (
            f"stopped by {self.cause} during start-up, before training; nothing was "
            "written. Run again to train."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cause,))


def quiet_background_tracebacks(debug: bool) -> None:
    """Unless `debug`, drops the tracebacks orbax logs in its threads as they fail.

    Such a failure is re-raised where looproto waits for the thread (a save, a close)
    and reported there as the fault's one line; the thread's own log of it would put a
    traceback before that line.
    """
    absl = logging.getLogger("absl")
    if debug:
        absl.removeFilter(_in_the_main_thread_or_no_traceback)
    else:
        absl.addFilter(_in_the_main_thread_or_no_traceback)


def _in_the_main_thread_or_no_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None or record.thread == threading.main_thread().ident
