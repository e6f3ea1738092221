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

import base64
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import numpy as np

from looproto import distributed
from looproto.errors import CheckpointError, ConfigError, value_repr
from looproto.module import (
    assign_variable,
    framework_backends,
    variable_to_numpy,
    variables_by_path,
)

__all__ = ["CheckpointManager", "checkpoints_iterator", "latest_step", "read_metadata"]

_log = logging.getLogger("looproto")

_FORMAT = "looproto.checkpoint"
_FORMAT_VERSION = 1
_STATE_ITEM = "state"
_META_ITEM = "meta"
_STEP_NAME = re.compile(r"[0-9]+")
# Dtype kinds orbax/tensorstore cannot store: objects, strings, bytes.
_UNSUPPORTED_KINDS = frozenset("OUS")
# Exceptions orbax/tensorstore raise for unreadable checkpoints (KeyError: a missing item).
_READ_ERRORS = (ValueError, KeyError, TypeError, OSError)
# Names a deleted step is renamed to before its files go, and a damaged one is moved to.
_DELETING = ".looproto-deleting"
_CORRUPTED = ".corrupted-"
# Markers of non-JSON values inside object states (a grain iterator's bytes, the
# torch tensors of a torchdata loader's sampler state).
_BYTES_KEY = "__looproto_bytes__"
_TENSOR_KEY = "__looproto_tensor__"


class _CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is unreadable or fails its integrity checks."""


# ----------------------------------------------------------------------------
# Listing committed steps (no orbax import: plain directory listing)


def _committed_steps(directory: str) -> list[int]:
    """Steps with a committed `<directory>/<step>/` directory, ascending."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(name)
        for name in names
        if _STEP_NAME.fullmatch(name) and os.path.isdir(os.path.join(directory, name))
    )


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


# ----------------------------------------------------------------------------
# What is saved


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, np.random.Generator)


class _StateDictAdapter:
    """The iterator-state protocol on `state_dict()`/`load_state_dict()` (torchdata)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def get_state(self) -> Any:
        return self._obj.state_dict()

    def set_state(self, state: Any) -> None:
        self._obj.load_state_dict(state)


_warned_unrestorable: set[type] = set()


def _torchdata_adapter(obj: Any) -> Any:
    """Adapts torchdata's `StatefulDataLoader` and its iterators, without importing torch.

    Only torchdata's classes: `torch.nn.Module` and optimizers have `state_dict` too,
    and their state is variables, not a data position.
    """
    if not type(obj).__module__.startswith("torchdata."):
        return None
    if not callable(getattr(obj, "state_dict", None)):
        return None
    if callable(getattr(obj, "load_state_dict", None)):
        return _StateDictAdapter(obj)
    if type(obj) not in _warned_unrestorable:
        _warned_unrestorable.add(type(obj))
        # A multi-worker iterator can only be restored through its loader, when the
        # loader is next iterated; an iterator created before the restore starts over.
        _log.warning(
            "The position of a %s cannot be restored in place; a resumed run starts it "
            "over. Checkpoint the `StatefulDataLoader` and call `iter()` on it after "
            "restoring, or use `num_workers=0`.",
            type(obj).__name__,
        )
    return None


def _state_adapter(obj: Any) -> Any:
    """What saves `obj`'s position: its backend's adapter, or `obj` itself, or None.

    A framework's objects are adapted by their backend first (optional
    `Backend.iterator_state(obj)`, e.g. for `tf.data` iterators), since a framework
    object with `get_state()` (a `torch.Generator`) may return framework values;
    then torchdata's loaders; then any object following the iterator-state protocol
    (callable `get_state()` and `set_state(state)`), such as grain's iterators and
    `looproto.data.ArrayIterator`. None when `obj` has no position to save.
    """
    if isinstance(obj, type):
        return None
    for backend in framework_backends(obj):
        adapt = getattr(backend, "iterator_state", None)
        adapter = adapt(obj) if adapt is not None else None
        if adapter is not None:
            return adapter
    adapter = _torchdata_adapter(obj)
    if adapter is not None:
        return adapter
    if callable(getattr(obj, "get_state", None)) and callable(getattr(obj, "set_state", None)):
        return obj
    return None


def _is_stateful(obj: Any) -> bool:
    return _is_generator(obj) or _state_adapter(obj) is not None


def _to_json(value: Any, where: str) -> Any:
    """`value` with NumPy scalars/arrays and tuples turned into JSON types.

    Raises:
        CheckpointError: Something is left that JSON cannot hold.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "numpy"):
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        return {
            _TENSOR_KEY: {
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "data": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        }
    if isinstance(value, (list, tuple)):
        return [_to_json(item, where) for item in value]
    if isinstance(value, dict):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(
                    f"The state of {where!r} has a dict key {key!r} of type "
                    f"{type(key).__name__}; expected string keys (JSON objects)."
                )
            converted[key] = _to_json(item, where)
        return converted
    raise CheckpointError(
        f"The state of {where!r} holds {value_repr(value)} of type {type(value).__name__}; "
        "expected JSON data (None, bool, int, float, str, lists, dicts with string keys, "
        "NumPy scalars or arrays, bytes, torch tensors)."
    )


def _from_json(value: Any, where: str) -> Any:
    """Undoes `_to_json`'s markers for bytes and torch tensors."""
    if isinstance(value, list):
        return [_from_json(item, where) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _BYTES_KEY in value:
        return base64.b64decode(value[_BYTES_KEY])
    if len(value) == 1 and _TENSOR_KEY in value:
        spec = value[_TENSOR_KEY]
        torch = sys.modules.get("torch")
        if torch is None:
            raise CheckpointError(
                f"The state of {where!r} holds a torch tensor, but torch is not imported."
            )
        array = np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"]))
        return torch.from_numpy(array.reshape(spec["shape"]).copy())
    return {key: _from_json(item, where) for key, item in value.items()}


def _crc32(array: np.ndarray[Any, Any]) -> int:
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(raw.data)


def _spec_text(shape: Any, dtype: Any) -> str:
    return f"shape={tuple(shape)} dtype={dtype}"


def _live_spec(variable: Any) -> tuple[tuple[int, ...], str]:
    """Shape and NumPy dtype name of a live variable, without copying when possible."""
    try:
        return tuple(int(d) for d in variable.shape), str(np.dtype(variable.dtype))
    except (AttributeError, TypeError):
        array = variable_to_numpy(variable)
        return tuple(array.shape), str(array.dtype)


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


# ----------------------------------------------------------------------------
# Changing the directory: deleting and setting aside steps, atomically


def _delete_step(directory: str, step: int) -> None:
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


def _remove_deleting_leftovers(directory: str) -> None:
    """Finishes deletions a crash interrupted (they are invisible already)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(_DELETING):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _quarantine(directory: str, step: int) -> str | None:
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


# ----------------------------------------------------------------------------
# Async saves survive a normal interpreter exit

# Managers with an asynchronous save under way. Strong references: the save must
# finish even if its manager is no longer referenced.
_PENDING: set[CheckpointManager] = set()
_exit_hook_installed = False


def _wait_at_exit(manager: CheckpointManager) -> None:
    """Makes interpreter shutdown wait for `manager`'s pending save."""
    global _exit_hook_installed
    _PENDING.add(manager)
    if _exit_hook_installed:
        return
    # `atexit` is too late: concurrent.futures shuts its executors down first and
    # orbax's commit then fails. Hooks registered here run before that, newest first
    # (so after-registering is enough), when the main thread finishes.
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - Python < 3.9 or another implementation
        return
    try:
        register(_finish_pending_saves)
    except RuntimeError:  # the interpreter is already shutting down
        return
    _exit_hook_installed = True


def _finish_pending_saves() -> None:
    for manager in list(_PENDING):
        try:
            manager.sync()
        except Exception as err:  # an exit hook must not raise: report and go on
            _log.error("An asynchronous checkpoint save failed at exit: %s", err)


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
# Multi-process runs (see `looproto.distributed`)


def _writes_checkpoints() -> bool:
    """Whether this process calls orbax's save.

    Under JAX every process does (orbax sees the processes and decides who writes
    what). Under torch and TensorFlow orbax cannot see the other processes, so only
    the chief writes; the others wait for it in `_share_save_outcome`.
    """
    engine = distributed.engine()
    return engine is None or engine.collective_checkpoints or engine.process_index == 0


def _check_replicas_agree(meta: dict[str, Any], step: int) -> None:
    """Every process holds the same values: a checkpoint keeps one copy of each."""
    values: dict[str, Any] = {path: spec["crc32"] for path, spec in meta["tree"].items()}
    objects = json.dumps(meta["objects"], sort_keys=True).encode()
    values["<object states>"] = zlib.crc32(objects)
    values["<step>"] = step
    distributed.check_same(
        values,
        f"the values of checkpoint {step} (CRC-32 of each array)",
        hint=(
            "A checkpoint holds one copy of every variable, so every process must hold the "
            "same values (data-parallel replicas); per-process state cannot be checkpointed. "
            "Nothing was written."
        ),
    )


def _share_save_outcome(step: int, error: str | None) -> None:
    """Waits for the chief's save (torch, TensorFlow) and fails if it failed."""
    outcomes = distributed.all_gather(error, f"the end of checkpoint {step}")
    if not distributed.is_chief() and outcomes[0] is not None:
        raise CheckpointError(f"Process 0 failed to save checkpoint {step}: {outcomes[0]}")


def _agree_on_restore(step: int | None) -> None:
    if distributed.process_count() > 1:
        chosen = -1 if step is None else step
        distributed.check_same(
            {"step": chosen},
            "which checkpoint to restore (-1: none)",
            hint="Every process must restore the same checkpoint; is the directory shared?",
        )


# ----------------------------------------------------------------------------
# Restore checks


def _json_crc32(meta: dict[str, Any]) -> int:
    """CRC-32 of the canonical JSON of everything in `meta` but its own checksum."""
    body = {key: value for key, value in meta.items() if key != "crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return zlib.crc32(text.encode("utf-8"))


def _parse_meta(meta: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The array tree and object states of a JSON item, validated."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _CorruptCheckpointError(
            f"Checkpoint {where} has no valid looproto metadata item; received {value_repr(meta)}."
        )
    # Checkpoints of looproto before this checksum have none; they are checked as before.
    if "crc32" in meta and meta["crc32"] != _json_crc32(meta):
        raise _CorruptCheckpointError(
            f"Checkpoint {where} has a damaged metadata item: its CRC-32 does not match "
            f"the recorded {value_repr(meta['crc32'])}."
        )
    version = meta.get("version")
    if version != _FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {where} has format version {version!r}; this looproto reads version "
            f"{_FORMAT_VERSION}. Upgrade looproto to read it."
        )
    tree = meta.get("tree")
    objects = meta.get("objects")
    if not isinstance(tree, dict) or not isinstance(objects, dict):
        raise _CorruptCheckpointError(f"Checkpoint {where} has a malformed metadata item.")
    for path, spec in tree.items():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("shape"), list)
            and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("crc32"), int)
        ):
            raise _CorruptCheckpointError(
                f"Checkpoint {where} has a malformed entry for {path!r}: {value_repr(spec)}."
            )
    for path, entry in objects.items():
        if not (isinstance(entry, dict) and "state" in entry and "kind" in entry):
            raise _CorruptCheckpointError(
                f"Checkpoint {where} has a malformed state for {path!r}: {value_repr(entry)}."
            )
    return tree, objects


def _check_matches(
    tree: dict[str, Any],
    objects: dict[str, Any],
    variables: dict[str, Any],
    live_objects: dict[str, Any],
    where: str,
) -> None:
    """Raises `CheckpointError` listing every path where checkpoint and live tree differ."""
    problems: list[str] = []
    for path in sorted(set(variables) - set(tree)):
        shape, dtype = _live_spec(variables[path])
        problems.append(f"  {path!r}: not in the checkpoint (live {_spec_text(shape, dtype)})")
    for path in sorted(set(tree) - set(variables)):
        spec = tree[path]
        problems.append(
            f"  {path!r}: in the checkpoint ({_spec_text(spec['shape'], spec['dtype'])}) "
            "but not a live variable"
        )
    for path in sorted(set(tree) & set(variables)):
        spec = tree[path]
        shape, dtype = _live_spec(variables[path])
        if tuple(spec["shape"]) != shape or spec["dtype"] != dtype:
            problems.append(
                f"  {path!r}: checkpoint {_spec_text(spec['shape'], spec['dtype'])}, "
                f"live {_spec_text(shape, dtype)}"
            )
    for path in sorted(set(live_objects) - set(objects)):
        problems.append(f"  {path!r}: object state not in the checkpoint")
    for path in sorted(set(objects) - set(live_objects)):
        problems.append(f"  {path!r}: object state in the checkpoint but no live object")
    for path in sorted(set(objects) & set(live_objects)):
        live_kind = "numpy_generator" if _is_generator(live_objects[path]) else "state"
        if objects[path]["kind"] != live_kind:
            problems.append(
                f"  {path!r}: checkpoint holds a {objects[path]['kind']!r} state, live object "
                f"is a {live_kind!r}"
            )
    if problems:
        raise CheckpointError(
            f"Checkpoint {where} does not match the variables of `checkpoint` "
            f"({len(problems)} difference(s)); nothing was restored:\n" + "\n".join(problems)
        )


def _set_object_state(obj: Any, state: Any, path: str | None = None) -> None:
    """Sets `state`; from a checkpoint's JSON (`path` given) it is decoded first."""
    if _is_generator(obj):
        obj.bit_generator.state = state
    else:
        _state_adapter(obj).set_state(state if path is None else _from_json(state, path))


def _get_object_state(obj: Any) -> Any:
    return obj.bit_generator.state if _is_generator(obj) else _state_adapter(obj).get_state()


def _write_all(
    variables: dict[str, Any],
    arrays: dict[str, Any],
    live_objects: dict[str, Any],
    objects: dict[str, Any],
    where: str,
) -> None:
    """Writes a checked checkpoint into the live tree; undoes it all if any write fails.

    A write can fail although the tree matched: an object may refuse a state of the
    same kind but another type (an `ArrayIterator` handed a `tf.data` iterator's state,
    from a checkpoint of another backend's pipeline; a Generator whose bit generator
    changed). Object states go first (small, and the likeliest to refuse); each
    variable's value is kept just before it is overwritten, so what was written can be
    put back.

    Raises:
        CheckpointError: A write failed; the path and the reason are named.
    """
    written_objects: list[tuple[Any, Any]] = []
    written_variables: list[tuple[Any, Any]] = []
    current, rejected = "", ""
    try:
        for path, obj in live_objects.items():
            current = path
            rejected = (
                f"; the live object at {path!r} ({type(obj).__name__}) rejected its saved "
                "state (was its type changed?)"
            )
            previous = _get_object_state(obj)
            _set_object_state(obj, objects[path]["state"], path)
            written_objects.append((obj, previous))
        rejected = ""
        for path, variable in variables.items():
            current = path
            previous = variable_to_numpy(variable)
            assign_variable(variable, arrays[path])
            written_variables.append((variable, previous))
    except Exception as err:
        for variable, previous in reversed(written_variables):
            assign_variable(variable, previous)
        for obj, previous in reversed(written_objects):
            _set_object_state(obj, previous)
        raise CheckpointError(
            f"Checkpoint {where} could not be restored: writing {current!r} failed "
            f"({type(err).__name__}: {err}){rejected}. Nothing was restored."
        ) from err


def _check_arrays(arrays: dict[str, Any], tree: dict[str, Any], where: str) -> None:
    """Raises `_CorruptCheckpointError` unless `arrays` are exactly what `tree` records."""
    problems: list[str] = []
    for path in sorted(set(tree) - set(arrays)):
        problems.append(f"  {path!r}: missing from the array data")
    for path in sorted(set(arrays) - set(tree)):
        problems.append(f"  {path!r}: in the array data but not in the metadata")
    for path in sorted(set(tree) & set(arrays)):
        spec = tree[path]
        array = arrays[path]
        if not isinstance(array, np.ndarray):
            problems.append(f"  {path!r}: read back as {type(array).__name__}, not an array")
            continue
        if tuple(array.shape) != tuple(spec["shape"]) or str(array.dtype) != spec["dtype"]:
            problems.append(
                f"  {path!r}: read {_spec_text(array.shape, array.dtype)}, recorded "
                f"{_spec_text(spec['shape'], spec['dtype'])}"
            )
            continue
        crc = _crc32(array)
        if crc != spec["crc32"]:
            problems.append(f"  {path!r}: CRC-32 {crc} does not match the recorded {spec['crc32']}")
    if problems:
        raise _CorruptCheckpointError(
            f"Checkpoint {where} is corrupted ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
