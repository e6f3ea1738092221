"""`CheckpointManager`: `tf.train.CheckpointManager`'s surface on orbax-checkpoint.

A checkpoint of a root object (a `Module`, a variable, or a dict/list of them)
holds every variable reachable from it, keyed by its path from
`variables_by_path` (e.g. `"model/layers/0/w"`), plus the JSON state of every
reachable object that follows the iterator-state protocol (callable
`get_state()` / `set_state(state)` with JSON-serialisable data) and of every
`numpy.random.Generator`. No pickle is used anywhere.

On disk, `<directory>/<step>/` is an orbax checkpoint with two items: `state`
(the arrays, OCDBT; left out when there are none) and `meta` (human-readable
JSON: format version, step, each array's shape, dtype and CRC-32, and the
objects' states). A step directory appears only when complete (orbax renames a
temporary directory on commit), and temporary directories left by a crash are
deleted when a manager opens the directory.

Restores are all-or-nothing: the stored tree is compared with the live one and
every array is read and checked against its recorded shape, dtype and CRC-32
before any variable is written, because orbax silently returns garbage for
overwritten bytes and an empty tree for a deleted item directory. A checkpoint
that `restore_or_initialize()` finds damaged is renamed to
`<step>.corrupted-<time>` (kept for inspection, never listed or deleted) and the
one before it is restored.

`max_to_keep` is applied by looproto, not orbax: older checkpoints are deleted
only once the newer ones being kept have been committed and pass a metadata check
(their JSON item and array index are complete), so a failed or damaged save never
costs the checkpoint before it. A deletion renames the step directory away first,
so a crash during it never leaves a half-deleted step that looks committed.

Asynchronous saves (`enable_async=True`) are waited for when the interpreter
exits normally (end of the script, `sys.exit`, an uncaught exception), before
Python shuts down the thread pools orbax needs; orbax alone loses them there.
`os._exit` and signals that kill the process still lose a save that is under
way (the previous checkpoint stays the newest). The `Controller` also waits for
them (`sync()`) at the end of every `train()`.

orbax (and through it JAX) is imported only when a manager is created.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import numpy as np

from looproto import distributed
from looproto._checkpoint_exit import _PENDING, _wait_at_exit
from looproto._checkpoint_files import (
    _STEP_NAME,
    _committed_steps,
    _delete_step,
    _quarantine,
    _remove_deleting_leftovers,
)
from looproto._checkpoint_processes import (
    _agree_on_restore,
    _check_replicas_agree,
    _share_save_outcome,
    _writes_checkpoints,
)
from looproto._checkpoint_state import (
    _FORMAT,
    _FORMAT_VERSION,
    _check_arrays,
    _check_matches,
    _CorruptCheckpointError,
    _crc32,
    _is_generator,
    _is_stateful,
    _json_crc32,
    _parse_meta,
    _state_adapter,
    _to_json,
    _write_all,
)
from looproto.errors import CheckpointError, ConfigError, value_repr
from looproto.module import variable_to_numpy, variables_by_path

__all__ = ["CheckpointManager", "checkpoints_iterator", "latest_step", "read_metadata"]

_log = logging.getLogger("looproto")

_STATE_ITEM = "state"
_META_ITEM = "meta"
# Dtype kinds orbax/tensorstore cannot store: objects, strings, bytes.
_UNSUPPORTED_KINDS = frozenset("OUS")
# Exceptions orbax/tensorstore raise for unreadable checkpoints (KeyError: a missing item).
_READ_ERRORS = (ValueError, KeyError, TypeError, OSError)


# ----------------------------------------------------------------------------
# Reading a checkpoint directory (no orbax import but in `read_metadata`)


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """Returns the newest committed step in `directory`, or None if there is none.

    Temporary directories of unfinished saves are ignored.
    """
    steps = _committed_steps(os.fspath(directory))
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
    steps = _committed_steps(path)
    if not steps:
        raise CheckpointError(f"No checkpoints in {path}.")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"No checkpoint {step} in {path}; committed steps there: {steps}.")
    import orbax.checkpoint as ocp

    # No cleanup options: reading must never change the directory.
    with ocp.CheckpointManager(
        path, item_handlers={_META_ITEM: ocp.JsonCheckpointHandler()}
    ) as manager:
        try:
            meta = manager.restore(
                step, args=ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()})
            )[_META_ITEM]
        except _READ_ERRORS as err:
            raise CheckpointError(
                f"Checkpoint {os.path.join(path, str(step))} is unreadable: "
                f"{type(err).__name__}: {err}"
            ) from err
    tree, objects = _parse_meta(meta, os.path.join(path, str(step)))
    return {"step": step, "steps": steps, "tree": tree, "objects": objects}


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


class CheckpointManager:
    """Saves and restores a root object's variables and state; keeps the newest N.

    The surface of `tf.train.CheckpointManager`, with orbax-checkpoint underneath.
    Checkpoints live at `<directory>/<step>/`.

    Example:
        >>> import tempfile
        >>> from looproto.module import Variable
        >>> w = Variable(np.zeros(3, np.float32), name="w")
        >>> manager = CheckpointManager(tempfile.mkdtemp(), {"w": w}, max_to_keep=3)
        >>> manager.restore_or_initialize() is None  # nothing saved yet
        True
        >>> os.path.basename(manager.save(checkpoint_number=100))
        '100'
        >>> manager.close()

    Args:
        directory: Where checkpoints go; created if missing. Stored as an absolute path.
        checkpoint: The root: a `Module`, a variable, or a mapping/list of them.
        max_to_keep: How many checkpoints to keep (older ones, including those of
            earlier runs, are deleted once a save is complete and the newest
            `max_to_keep` pass a metadata check); None keeps all.
        checkpoint_interval: Least number of steps between two saves; needs
            `step_counter`. None saves on every `save()` call.
        step_counter: A scalar variable (or anything `int()` accepts) holding the
            current step; `save()` numbers checkpoints by it.
        init_fn: Called by `restore_or_initialize()` when there is nothing to restore.
        enable_async: Write in a background thread: `save()` returns once the arrays
            are copied. Call `sync()` or `close()` before the process exits.

    Raises:
        ConfigError: An argument has the wrong type or value: `max_to_keep` or
            `checkpoint_interval` not a positive int (or None), `checkpoint_interval`
            without `step_counter`, a `step_counter` that is not an integer, a
            non-callable `init_fn`, a non-bool `enable_async`, or a `directory`
            that is not a path.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        checkpoint: Any,
        *,
        max_to_keep: int | None = 5,
        checkpoint_interval: int | None = None,
        step_counter: Any = None,
        init_fn: Callable[[], None] | None = None,
        enable_async: bool = False,
    ) -> None:
        path = _check_directory(directory)
        if max_to_keep is not None and not _is_positive_int(max_to_keep):
            raise ConfigError(
                f"`max_to_keep` must be a positive int or None (keep all); received "
                f"max_to_keep={value_repr(max_to_keep)}."
            )
        if checkpoint_interval is not None:
            if not _is_positive_int(checkpoint_interval):
                raise ConfigError(
                    f"`checkpoint_interval` must be a positive int or None; received "
                    f"checkpoint_interval={value_repr(checkpoint_interval)}."
                )
            if step_counter is None:
                raise ConfigError(
                    f"`checkpoint_interval` is {checkpoint_interval!r} but `step_counter` is "
                    "None: an interval needs a step counter to measure it (pass "
                    "`step_counter=global_step`)."
                )
        if step_counter is not None:
            try:
                if isinstance(step_counter, (str, bytes)):
                    raise TypeError("a string is not a step counter")
                _as_int(step_counter)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    "`step_counter` must be a scalar integer variable (or anything `int()` "
                    f"accepts); received step_counter={value_repr(step_counter)}."
                ) from err
        if init_fn is not None and not callable(init_fn):
            raise ConfigError(
                f"`init_fn` must be callable or None; received init_fn={value_repr(init_fn)}."
            )
        if not isinstance(enable_async, bool):
            raise ConfigError(
                f"`enable_async` must be a bool; received enable_async={value_repr(enable_async)}."
            )
        import orbax.checkpoint as ocp

        self._ocp: Any = ocp
        self._directory = path
        self._checkpoint = checkpoint
        self._max_to_keep = max_to_keep
        self._checkpoint_interval = checkpoint_interval
        self._step_counter = step_counter
        self._init_fn = init_fn
        self._enable_async = enable_async
        self._last_checkpoint_step: int | None = None
        self._pending_step: int | None = None
        # Steps whose metadata check passed (files of a committed step do not change).
        self._verified: set[int] = set()
        self._closed = False
        _remove_deleting_leftovers(self._directory)
        options = ocp.CheckpointManagerOptions(
            # Retention is looproto's (`_prune`): orbax would delete old steps even
            # when the new save failed in its background thread.
            max_to_keep=None,
            # Only a process that writes may delete what an unfinished save left behind.
            cleanup_tmp_directories=_writes_checkpoints(),
            enable_async_checkpointing=enable_async,
        )
        self._manager: Any = ocp.CheckpointManager(
            self._directory, options=options, item_handlers=self._item_handlers()
        )

    def _item_handlers(self) -> dict[str, Any]:
        return {
            _STATE_ITEM: self._ocp.StandardCheckpointHandler(),
            _META_ITEM: self._ocp.JsonCheckpointHandler(),
        }

    # ------------------------------------------------------------------ properties

    @property
    def directory(self) -> str:
        """The absolute checkpoint directory."""
        return self._directory

    @property
    def checkpoint(self) -> Any:
        """The root object whose state is saved."""
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        """Least number of steps between saves, or None."""
        return self._checkpoint_interval

    @property
    def max_to_keep(self) -> int | None:
        """How many checkpoints are kept; None keeps all."""
        return self._max_to_keep

    @property
    def checkpoints(self) -> list[str]:
        """Paths of the committed checkpoints on disk, oldest first."""
        return [self._path(step) for step in _committed_steps(self._directory)]

    @property
    def latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        step = latest_step(self._directory)
        return None if step is None else self._path(step)

    def _path(self, step: int) -> str:
        return os.path.join(self._directory, str(step))

    # ------------------------------------------------------------------ save

    def save(self, checkpoint_number: int | None = None, check_interval: bool = True) -> str | None:
        """Saves a checkpoint unless the interval says not to; returns its path or None.

        `tf.train.CheckpointManager.save`'s rules: with a `checkpoint_interval`, a
        save at the step of the last save is skipped, and so (if `check_interval`)
        is a save fewer than `checkpoint_interval` steps after it; the first save
        always happens. A step that already exists on disk, or one lower than the
        newest on disk, is skipped with a logged warning (nothing is overwritten).

        Args:
            checkpoint_number: The step to number the checkpoint by; defaults to
                `int(step_counter)`, or the newest step on disk + 1 without one.
            check_interval: False saves even if less than `checkpoint_interval` steps
                passed (still never twice at the same step).

        Raises:
            CheckpointError: The manager is closed, a value cannot be stored, or an
                earlier asynchronous save failed.
        """
        if self._closed:
            raise CheckpointError(
                f"`save()` called on a closed CheckpointManager ({self._directory})."
            )
        if self._checkpoint_interval is not None:
            current = _as_int(self._step_counter)
            if self._last_checkpoint_step is not None:
                if current == self._last_checkpoint_step:
                    return None
                if (
                    check_interval
                    and current < self._last_checkpoint_step + self._checkpoint_interval
                ):
                    return None
            self._last_checkpoint_step = current
        on_disk = set(_committed_steps(self._directory)) | set(self._manager.all_steps())
        if distributed.process_count() > 1:
            # Every process must take the same decision: on what the chief sees on disk
            # (another process may look after the chief already wrote this step).
            on_disk = set(distributed.all_gather(sorted(on_disk), "a checkpoint save")[0])
        if checkpoint_number is not None:
            step = _as_int(checkpoint_number)
        elif self._step_counter is not None:
            step = _as_int(self._step_counter)
        else:
            step = max(on_disk, default=0) + 1
        if step < 0:
            raise CheckpointError(f"`checkpoint_number` must be >= 0; received {step}.")
        if step in on_disk:
            _log.warning(
                "Not saving checkpoint %d: %s already exists (from an earlier save or run); "
                "checkpoints are never overwritten.",
                step,
                self._path(step),
            )
            return None
        newest = max(on_disk, default=None)
        if newest is not None and step < newest:
            _log.warning(
                "Not saving checkpoint %d: it is older than the newest checkpoint %d in %s; "
                "checkpoint steps must increase.",
                step,
                newest,
                self._directory,
            )
            return None
        arrays, meta = self._collect(step)
        ocp = self._ocp
        items: dict[str, Any] = {_META_ITEM: ocp.args.JsonSave(meta)}
        if arrays:
            items[_STATE_ITEM] = ocp.args.StandardSave(arrays)
        self._check_async_errors()
        multi = distributed.process_count() > 1
        if multi:
            _check_replicas_agree(meta, step)
        try:
            if _writes_checkpoints():
                saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            else:
                saved = True
        except Exception as err:
            error = CheckpointError(f"Saving checkpoint {step} to {self._directory} failed: {err}")
            if multi:
                _share_save_outcome(step, str(error))
            raise error from err
        if multi:
            _share_save_outcome(step, None if saved else "orbax declined to save it")
        if not saved:
            _log.warning("orbax declined to save checkpoint %d in %s.", step, self._directory)
            return None
        if self._enable_async:
            self._pending_step = step
            _wait_at_exit(self)
        else:
            self._prune()
        return self._path(step)

    def _collect(self, step: int) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        """Host copies of all arrays, and the JSON item describing them."""
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        tree: dict[str, Any] = {}
        for path, variable in variables_by_path(self._checkpoint).items():
            array = np.asarray(variable_to_numpy(variable))
            if array.dtype.kind in _UNSUPPORTED_KINDS:
                raise CheckpointError(
                    f"Variable {path!r} has dtype {array.dtype}, which checkpoints cannot "
                    "store; expected a numeric or bool dtype."
                )
            arrays[path] = array
            tree[path] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "crc32": _crc32(array),
            }
        objects: dict[str, Any] = {}
        for path, obj in variables_by_path(self._checkpoint, predicate=_is_stateful).items():
            if _is_generator(obj):
                state = _to_json(obj.bit_generator.state, path)
                objects[path] = {"kind": "numpy_generator", "state": state}
            else:
                state = _to_json(_state_adapter(obj).get_state(), path)
                objects[path] = {"kind": "state", "state": state}
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "step": step,
            "tree": tree,
            "objects": objects,
        }
        try:
            # The JSON item's own checksum: a flipped digit in a shape or an iterator
            # position would otherwise restore silently.
            meta["crc32"] = _json_crc32(meta)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"Checkpoint {step}: state is not JSON data: {err}") from err
        return arrays, meta

    # ------------------------------------------------------------------ async

    def _check_async_errors(self) -> None:
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        _PENDING.discard(self)
        try:
            self._manager.wait_until_finished()
            # orbax logs a failed background commit instead of raising it.
            self._manager.check_for_errors()
        except Exception as err:
            raise CheckpointError(
                f"The asynchronous save of checkpoint {step} to {self._directory} failed: {err}"
            ) from err
        if step not in _committed_steps(self._directory):
            raise CheckpointError(
                f"The asynchronous save of checkpoint {step} to {self._directory} did not "
                "commit (see orbax's log above); older checkpoints were kept."
            )
        self._prune()

    # ------------------------------------------------------------------ retention

    def _prune(self) -> None:
        """Deletes the checkpoints older than the newest `max_to_keep` good ones.

        Only checkpoints that pass `_looks_complete` count; if fewer than
        `max_to_keep` do, nothing is deleted, so the last good checkpoint survives a
        save that came out damaged.
        """
        if self._max_to_keep is None or not distributed.is_chief():
            return  # In a multi-process run the chief alone deletes (plain file operations).
        steps = _committed_steps(self._directory)
        good: list[int] = []
        for step in reversed(steps):
            if self._looks_complete(step):
                good.append(step)
                if len(good) == self._max_to_keep:
                    break
            else:
                _log.warning(
                    "Checkpoint %s is incomplete (its metadata or array index is missing or "
                    "malformed); it does not count towards `max_to_keep`, and older "
                    "checkpoints are kept in its place.",
                    self._path(step),
                )
        if len(good) < self._max_to_keep:
            return
        doomed = [step for step in steps if step < good[-1]]
        for step in doomed:
            _delete_step(self._directory, step)
            self._verified.discard(step)
        if doomed:
            self._manager.reload()

    def _looks_complete(self, step: int) -> bool:
        """Cheap check of a committed step: JSON item valid, array index lists every path.

        Reads two small JSON files, no array data (the CRC-32s are checked on restore).
        """
        if step in self._verified:
            return True
        where = self._path(step)
        try:
            with open(os.path.join(where, _META_ITEM, "metadata"), encoding="utf-8") as f:
                tree, _ = _parse_meta(json.load(f), where)
            if tree:
                with open(os.path.join(where, _STATE_ITEM, "_METADATA"), encoding="utf-8") as f:
                    index = json.load(f)["tree_metadata"]
                if not all(repr((path,)) in index for path in tree):
                    return False
        except (OSError, ValueError, KeyError, TypeError, CheckpointError):
            return False
        self._verified.add(step)
        return True

    def sync(self) -> None:
        """Waits for an asynchronous save to finish.

        Raises:
            CheckpointError: That save failed (the original error is its cause).
        """
        if self._closed:
            return
        self._check_async_errors()
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources. Idempotent.

        Raises:
            CheckpointError: A pending asynchronous save failed.
        """
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            _PENDING.discard(self)
            self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, checkpoint: str | int | os.PathLike[str]) -> str:
        """Restores every variable and object state from a checkpoint; returns its path.

        Nothing is written unless the whole checkpoint matches the live tree and
        passes its integrity checks.

        Args:
            checkpoint: A step number, or a checkpoint path `<dir>/<step>` (which may
                be in another directory).

        Raises:
            CheckpointError: There is no such checkpoint; it does not match the live
                variables (every differing path is listed); or it is unreadable or
                corrupted.
        """
        if self._closed:
            raise CheckpointError(
                f"`restore()` called on a closed CheckpointManager ({self._directory})."
            )
        directory, step = self._locate(checkpoint)
        self.sync()
        self._restore_step(directory, step)
        return os.path.join(directory, str(step))

    def _locate(self, checkpoint: str | int | os.PathLike[str]) -> tuple[str, int]:
        if isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool):
            directory, step = self._directory, int(checkpoint)
        elif isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(checkpoint))
            directory, name = os.path.split(path)
            if not _STEP_NAME.fullmatch(name):
                raise CheckpointError(
                    f"`checkpoint` must be a step number or a path `<directory>/<step>`; "
                    f"received {value_repr(checkpoint)}."
                )
            step = int(name)
        else:
            raise CheckpointError(
                f"`checkpoint` must be a step number or a path `<directory>/<step>`; "
                f"received {value_repr(checkpoint)} of type {type(checkpoint).__name__}."
            )
        if step not in _committed_steps(directory):
            raise CheckpointError(
                f"No checkpoint {step} in {directory}; committed steps there: "
                f"{_committed_steps(directory)}."
            )
        return directory, step

    def _read(self, directory: str, step: int, **items: Any) -> Any:
        """One orbax restore; read failures become `_CorruptCheckpointError`."""
        try:
            return self._manager.restore(
                step, directory=directory, args=self._ocp.args.Composite(**items)
            )
        except _READ_ERRORS as err:
            raise _CorruptCheckpointError(
                f"Checkpoint {os.path.join(directory, str(step))} is unreadable: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _restore_step(self, directory: str, step: int) -> None:
        where = os.path.join(directory, str(step))
        meta = self._read(directory, step, **{_META_ITEM: self._ocp.args.JsonRestore()})[_META_ITEM]
        tree, objects = _parse_meta(meta, where)

        variables = variables_by_path(self._checkpoint)
        live_objects = variables_by_path(self._checkpoint, predicate=_is_stateful)
        _check_matches(tree, objects, variables, live_objects, where)

        arrays: dict[str, Any] = {}
        if tree:
            arrays = dict(
                self._read(directory, step, **{_STATE_ITEM: self._ocp.args.StandardRestore()})[
                    _STATE_ITEM
                ]
            )
        _check_arrays(arrays, tree, where)

        _write_all(variables, arrays, live_objects, objects, where)

    def restore_or_initialize(self) -> str | None:
        """Restores the newest good checkpoint, or calls `init_fn` if there is none.

        A checkpoint that is unreadable or fails its integrity checks is renamed to
        `<step>.corrupted-<unix time>` (kept, but no longer listed, so later saves
        may reuse its step) with a warning naming it and the reason, and the one
        before it is tried. A checkpoint that does not match the live variables
        raises instead (that is a code change, not damage). After a restore, the
        save interval counts from the restored step.

        Returns:
            The restored checkpoint's path, or None if `init_fn` ran (or nothing did).

        Raises:
            CheckpointError: The newest readable checkpoint does not match the live tree.
        """
        self.sync()
        for step in reversed(_committed_steps(self._directory)):
            try:
                self._restore_step(self._directory, step)
            except _CorruptCheckpointError as err:
                moved = _quarantine(self._directory, step)
                self._verified.discard(step)
                self._manager.reload()
                _log.warning(
                    "Skipping corrupted checkpoint %d in %s and trying the previous one%s: %s",
                    step,
                    self._directory,
                    f" (moved it to {moved})" if moved else "",
                    err,
                )
                continue
            _agree_on_restore(step)
            self._last_checkpoint_step = step
            return self._path(step)
        _agree_on_restore(None)
        if self._init_fn is not None:
            self._init_fn()
        return None

    def __repr__(self) -> str:
        return (
            f"CheckpointManager(directory={self._directory!r}, max_to_keep={self._max_to_keep}, "
            f"checkpoint_interval={self._checkpoint_interval})"
        )


# ----------------------------------------------------------------------------
# Checking the manager's arguments


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except TypeError:
        return int(variable_to_numpy(value))


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)


def _check_directory(directory: Any) -> str:
    try:
        path = os.fspath(directory)
    except TypeError:
        path = None
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "`directory` must be a non-empty path (a str or an `os.PathLike` of one); "
            f"received directory={value_repr(directory)}."
        )
    return os.path.abspath(path)
