"""The files of a checkpoint directory: its layout, listing, deletion and quarantine.

A committed step is a `<directory>/<step>/` directory whose name is all digits, with
two orbax items: `state` (the arrays) and `meta` (the JSON item);
everything else there (orbax's temporary directories, deletions under way,
quarantined steps) is never listed. Changes are renames first: a deleted step is
renamed to `.<step>.looproto-deleting` before its files go, so a crash mid-deletion
never leaves a half-deleted step that looks committed (the leftovers are removed when
the next manager opens the directory), and a damaged step is set aside as
`<step>.corrupted-<time>`, kept for inspection. Plain directory operations: no
orbax import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

from looproto.checkpoint._state import parse_meta
from looproto.errors import CheckpointError

_log = logging.getLogger("looproto")

STATE_ITEM = "state"
META_ITEM = "meta"
# Exceptions orbax/tensorstore raise for unreadable checkpoints (KeyError: a missing item).
READ_ERRORS = (ValueError, KeyError, TypeError, OSError)

STEP_NAME = re.compile(r"[0-9]+")
# Names a deleted step is renamed to before its files go, and a damaged one is moved to.
_DELETING = ".looproto-deleting"
_CORRUPTED = ".corrupted-"


# ----------------------------------------------------------------------------
# Listing committed steps (no orbax import: plain directory listing)


def committed_steps(directory: str) -> list[int]:
    """Steps with a committed `<directory>/<step>/` directory, ascending."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(name)
        for name in names
        if STEP_NAME.fullmatch(name) and os.path.isdir(os.path.join(directory, name))
    )


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


def remove_deleting_leftovers(directory: str) -> None:
    """Finishes deletions a crash interrupted (they are invisible already)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(_DELETING):
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
