"""Reading a checkpoint directory from outside a manager: what an evaluator or a user does.

`latest_step` and `checkpoints_iterator` list committed steps, and `read_metadata`
reads one checkpoint's JSON item without any array data; none imports orbax. None
of them changes the directory, and each tolerates steps that the directory's owner
deletes while it reads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from looproto.checkpoint._files import META_ITEM, committed_steps
from looproto.checkpoint._state import parse_meta
from looproto.errors import CheckpointError

__all__ = ["checkpoints_iterator", "latest_step", "read_metadata"]


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """Returns the newest committed step in `directory`, or None if there is none.

    Temporary directories of unfinished saves are ignored.
    """
    steps = committed_steps(os.fspath(directory))
    return steps[-1] if steps else None


def read_metadata(directory: str | os.PathLike[str], step: int | None = None) -> dict[str, Any]:
    """The JSON item of a checkpoint: what it holds, without reading any array.

    Works for a checkpoint written by any backend: it is the same tree of plain
    arrays whatever wrote it.

    Args:
        directory: A checkpoint directory (holding `<step>/` directories).
        step: Which step; default the newest.

    Returns:
        `{"step": int, "steps": [all committed steps], "tree": {path: {"shape",
        "dtype", "crc32"}}, "objects": {path: {"kind", "state"}}}`.

    Raises:
        CheckpointError: There is no such checkpoint, or its metadata is unreadable.
    """
    path = os.path.abspath(os.fspath(directory))
    for _ in range(5):
        steps = committed_steps(path)
        if not steps:
            raise CheckpointError(f"No checkpoints in {path}.")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(
                f"No checkpoint {chosen} in {path}; committed steps there: {steps}."
            )
        where = os.path.join(path, str(chosen))
        try:
            # orbax's JSON item is a plain file: read without opening a manager (no
            # listing of every step, no import of orbax).
            with open(os.path.join(where, META_ITEM, "metadata"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            if os.path.isdir(where):
                raise CheckpointError(
                    f"Checkpoint {where} is unreadable: {type(err).__name__}: {err}"
                ) from err
            if step is not None:
                raise CheckpointError(
                    f"Checkpoint {where} was deleted while it was read (by the process "
                    "that owns the directory)."
                ) from err
            continue  # the owner deleted the newest-but-N meanwhile: list again
        tree, objects = parse_meta(meta, where)
        return {"step": chosen, "steps": steps, "tree": tree, "objects": objects}
    raise CheckpointError(f"The checkpoints in {path} kept being deleted while they were read.")


def checkpoints_iterator(
    directory: str | os.PathLike[str],
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Yields the path of the newest checkpoint in `directory` each time it changes.

    `tf.train.checkpoints_iterator`'s semantics: the newest checkpoint already
    present is yielded at once; then the directory is polled for a newer one. If
    none appears within `timeout` seconds, `timeout_fn()` is called: the iterator
    stops when it returns True or when there is no `timeout_fn`, and keeps
    waiting otherwise. Only committed steps count.

    Args:
        directory: The checkpoint directory (it need not exist yet).
        min_interval_secs: Least time between two yields, in seconds.
        timeout: Seconds to wait for a new checkpoint; None waits forever.
        timeout_fn: Called after each timeout; returns True to stop.
    """
    path = os.fspath(directory)
    last: str | None = None
    while True:
        found = _wait_for_new_checkpoint(path, last, timeout)
        if found is None:
            if timeout_fn is None or timeout_fn():
                return
            continue
        start = time.monotonic()
        last = found
        yield found
        remaining = start + min_interval_secs - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


def _wait_for_new_checkpoint(directory: str, last: str | None, timeout: float | None) -> str | None:
    poll = 0.25
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = latest_step(directory)
        if step is not None:
            path = os.path.join(directory, str(step))
            if path != last:
                return path
        if deadline is None:
            time.sleep(poll)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(poll, remaining))
