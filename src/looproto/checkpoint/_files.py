"""The files of a checkpoint directory: its layout, listing, deletion and quarantine.

A committed step is a `<directory>/<step>/` directory whose name is all digits, with
two orbax items: `state` (the arrays) and `meta` (the JSON item);
everything else there (orbax's temporary directories, deletions under way,
quarantined steps, the owner's lock) is never listed. Changes are renames first: a deleted step is
renamed to `.<step>.looproto-deleting` before its files go, so a crash mid-deletion
never leaves a half-deleted step that looks committed (the leftovers are removed when
the next owner takes the directory, see `_lock.py`), and a damaged step is set aside as
`<step>.corrupted-<time>`, kept for inspection. Plain directory operations: no
orbax import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

from looproto.checkpoint._state import parse_meta
from looproto.errors import CheckpointError, CheckpointStorageError

T = TypeVar("T")

_log = logging.getLogger("looproto")

STATE_ITEM = "state"
META_ITEM = "meta"
# Exceptions orbax/tensorstore raise for unreadable checkpoints (KeyError: a missing item).
READ_ERRORS = (ValueError, KeyError, TypeError, OSError)

STEP_NAME = re.compile(r"[0-9]+")
# Names a deleted step is renamed to before its files go, and a damaged one is moved to.
_DELETING = ".looproto-deleting"
_CORRUPTED = ".corrupted-"
# orbax's unfinished saves: `<step>.orbax-checkpoint-tmp` (a suffix follows in some versions).
_TEMPORARY = re.compile(r"[0-9]+\.orbax-checkpoint-tmp.*")
_LOCK_TAKEOVER = ".looproto-lock."


# ----------------------------------------------------------------------------
# Listing committed steps (no orbax import: plain directory listing)


_LISTING_ATTEMPTS = 5


def committed_steps(directory: str) -> list[int]:
    """Steps with a committed `<directory>/<step>/` directory, ascending.

    A listing is not a snapshot: one taken while the owner commits step N+1 and deletes
    step N (two renames) can miss both. So a listing during which the directory changed
    (its modification time moved) is taken again, and an empty one is checked once more.
    """
    steps: list[int] = []
    for attempt in range(_LISTING_ATTEMPTS):
        try:
            before = os.stat(directory).st_mtime_ns
            steps = sorted(
                int(name)
                for name in os.listdir(directory)
                if STEP_NAME.fullmatch(name) and os.path.isdir(os.path.join(directory, name))
            )
            after = os.stat(directory).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return []
        if before == after and (steps or attempt > 0):
            break
    return steps


# ----------------------------------------------------------------------------
# Changing the directory: deleting and setting aside steps, atomically


def delete_step(directory: str, step: int) -> None:
    """Deletes `<directory>/<step>`: renamed away first, so it vanishes in one step."""
    trash = os.path.join(directory, f".{step}{_DELETING}")
    try:
        os.rename(os.path.join(directory, str(step)), trash)
    except FileNotFoundError:
        return
    except OSError as err:  # e.g. a leftover of a crashed deletion of the same step
        _log.warning("Could not delete checkpoint %d in %s: %s", step, directory, err)
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(directory: str) -> list[str]:
    """Removes what dead writers left: unfinished saves and deletions; returns the names.

    Only the owner of `directory` calls it, right after taking its lock: every
    writer before it is gone, so nothing removed here is a save under way.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        if _TEMPORARY.fullmatch(name) or (name.startswith(".") and name.endswith(_DELETING)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
        elif name.startswith(_LOCK_TAKEOVER):  # a takeover that crashed half-way
            with contextlib.suppress(OSError):
                os.unlink(path)
    return removed


def remove_unfinished(directory: str, step: int) -> None:
    """Removes the temporary directory of this owner's own failed save of `step`.

    On a full disk this gives the space back at once instead of at the next start.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if _TEMPORARY.fullmatch(name) and name.partition(".")[0] == str(step):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def quarantine(directory: str, step: int) -> str | None:
    """Renames a damaged step to `<step>.corrupted-<time>`; returns the new path."""
    target = os.path.join(directory, f"{step}{_CORRUPTED}{int(time.time())}")
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(directory, f"{step}{_CORRUPTED}{int(time.time())}-{suffix}")
    try:
        os.rename(os.path.join(directory, str(step)), target)
    except OSError:  # already gone (deleted by another process), or read-only
        return None
    return target


def looks_complete(where: str) -> bool:
    """Cheap check of a committed step: JSON item valid, array index lists every path.

    Reads two small JSON files, no array data (the CRC-32s are checked on restore).
    """
    try:
        with open(os.path.join(where, META_ITEM, "metadata"), encoding="utf-8") as f:
            tree, _ = parse_meta(json.load(f), where)
        if tree:
            with open(os.path.join(where, STATE_ITEM, "_METADATA"), encoding="utf-8") as f:
                index = json.load(f)["tree_metadata"]
            if not all(repr((path,)) in index for path in tree):
                return False
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return False
    return True


# ----------------------------------------------------------------------------
# The directory as the environment gives it: usable or not, and failures of I/O


def check_usable_directory(path: str, *, create: bool) -> None:
    """Raises `CheckpointStorageError` unless `path` is (or can be made) a directory.

    A file or a dangling symbolic link at `path` (or above it), or a directory that
    cannot be created, is reported at once, before anything trains.
    """
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointStorageError(
            f"The checkpoint directory {path} is a dangling symbolic link (to "
            f"{os.readlink(path)!r}); expected a directory."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointStorageError(
            f"The checkpoint directory {path} is a file, not a directory; move the file "
            "away or choose another directory."
        )
    if not create or os.path.isdir(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise CheckpointStorageError(
            f"Cannot create the checkpoint directory {path}: {err.strerror or err}."
        ) from err


# What the operating system says when storage fails, as errno numbers and as the text
# tensorstore puts in the ValueErrors it raises for them.
_STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
    | {errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
)
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_STORAGE_TEXT = (
    "no space left",
    "disk quota",
    "read-only file system",
    "permission denied",
    "input/output error",
    "resource_exhausted",
)


def save_failure(err: BaseException, what: str) -> CheckpointError:
    """The looproto error for a failed save: a storage error when the OS refused."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
            return CheckpointStorageError(
                f"{what}: {cause.strerror or cause} ({errno.errorcode.get(cause.errno or 0)}); "
                "the previous checkpoints are kept."
            )
        # tensorstore's errors carry the OS error inside a long message with its spec.
        code = _OS_ERROR_CODE.search(str(cause))
        if code is not None and int(code[1]) in _STORAGE_ERRNOS:
            number = int(code[1])
            return CheckpointStorageError(
                f"{what}: {os.strerror(number)} ({errno.errorcode[number]}); "
                "the previous checkpoints are kept."
            )
        if any(text in str(cause).lower() for text in _STORAGE_TEXT):
            return CheckpointStorageError(
                f"{what}: {_first_line(cause)}; the previous checkpoints are kept."
            )
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, CheckpointError):
        return err
    return CheckpointError(f"{what}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def retry_listing(open_fn: Callable[[], T], attempts: int = 5) -> T:
    """Calls `open_fn` (which lists the directory) again if a step vanished meanwhile.

    orbax reads each step it lists; a step the owner deletes between the listing and
    the read fails it with `FileNotFoundError`. Another listing no longer has it.
    """
    for attempt in range(attempts):
        try:
            return open_fn()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover
