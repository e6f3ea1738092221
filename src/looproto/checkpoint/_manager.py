"""`CheckpointManager`: `tf.train.CheckpointManager`'s surface on orbax-checkpoint.

How checkpoints are laid out, checked and kept is described in `looproto.checkpoint`;
this file holds the manager that saves, prunes and restores them. It runs past 500
lines because the manager is one class whose public methods carry the full rules of
`tf.train.CheckpointManager` in their docstrings; its helpers live in the other files.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from looproto import distributed
from looproto._validate import positive_int
from looproto.checkpoint._best import BestFn, check_best, metrics_json, read_metrics, score, select
from looproto.checkpoint._exit import OPEN, PENDING, close_at_exit, wait_at_exit
from looproto.checkpoint._files import (
    META_ITEM,
    READ_ERRORS,
    STATE_ITEM,
    STEP_NAME,
    check_usable_directory,
    committed_steps,
    delete_step,
    looks_complete,
    quarantine,
    remove_leftovers,
    remove_unfinished,
    retry_listing,
    save_failure,
)
from looproto.checkpoint._live import check_allow_missing, live_tree
from looproto.checkpoint._lock import DirectoryLock
from looproto.checkpoint._processes import (
    agree_on_restore,
    check_replicas_agree,
    share_save_outcome,
    writes_checkpoints,
)
from looproto.checkpoint._reading import latest_step
from looproto.checkpoint._state import (
    CorruptCheckpointError,
    check_arrays,
    check_matches,
    collect,
    json_crc32,
    non_finite,
    parse_meta,
    write_all,
)
from looproto.errors import CheckpointError, ConfigError, NonFiniteError, value_repr
from looproto.module import read_int

__all__ = ["CheckpointManager"]

_log = logging.getLogger("looproto")


class CheckpointManager:
    """Saves and restores a root object's variables and state; keeps the newest N (and best k).

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
        allow_missing: Live paths (or glob patterns, `"scheduler/*"`) that a checkpoint
            may lack: restores keep their live values instead of refusing. For
            checkpoints written before looproto (or your code) captured that state;
            the resumed run is then not exact for it. Default: none.
        best_fn: Which checkpoints are best: an evaluation output key (`"eval_loss"`,
            `"metrics/mae"` for a nested one) or a callable of the metrics a checkpoint
            was saved with (`save(metrics=...)`; the `Controller` passes each
            evaluation's output and saves every evaluated step) returning a number.
        best_mode: `"max"` (higher is better) or `"min"`.
        keep_best: Besides the newest `max_to_keep`, keep the `keep_best` best
            checkpoints by `best_fn` (default 1 with a `best_fn`). Checkpoints saved
            without metrics (or whose score is not finite) are kept by age alone.
        read_only: Only read (an evaluator beside a trainer, a notebook): never take
            the directory's lock, never delete, rename or create anything there;
            `save()` raises. A damaged checkpoint is skipped but left in place.
        check_finite: Refuse to save a checkpoint in which a floating-point variable
            holds NaN or an infinity (`NonFiniteError`, naming the step and the
            variable): a diverged run never replaces a good checkpoint.

    A manager that is not `read_only` owns its directory from `__init__` until
    `close()`: it takes the directory's lock (`<directory>/.looproto-lock`, naming its
    host and process), so a second writer fails at once, and it removes what dead
    writers left (unfinished saves and deletions). Managers in one process share the
    ownership. Only the owner deletes (retention), renames (a damaged checkpoint) or
    cleans; readers list and read, and tolerate steps the owner deletes meanwhile.

    Raises:
        ConfigError: An argument has the wrong type or value: `max_to_keep` or
            `checkpoint_interval` not a positive int (or None), `checkpoint_interval`
            without `step_counter`, a `step_counter` that is not an integer, a
            non-callable `init_fn`, a non-bool flag, or a `directory` that is not a
            path, or a `best_fn`/`best_mode`/`keep_best` that is invalid (`keep_best`
            without `best_fn`).
        CheckpointStorageError: `directory` cannot be used: it is a file or a dangling
            symbolic link, cannot be created or written, or another live process
            owns it.
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
        allow_missing: Sequence[str] = (),
        best_fn: str | BestFn | None = None,
        best_mode: str = "max",
        keep_best: int | None = None,
        read_only: bool = False,
        check_finite: bool = False,
    ) -> None:
        path = _check_directory(directory)
        self._allow_missing = check_allow_missing(allow_missing)
        self._keep_best = check_best(best_fn, best_mode, keep_best)
        self._best_fn = best_fn
        self._best_mode = best_mode
        self._scores: dict[int, float | None] = {}  # by step, read from disk once
        positive_int(max_to_keep, "max_to_keep", allow_none=True, hint=" (keep all)")
        if checkpoint_interval is not None:
            positive_int(checkpoint_interval, "checkpoint_interval", allow_none=True)
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
                read_int(step_counter)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    "`step_counter` must be a scalar integer variable (or anything `int()` "
                    f"accepts); received step_counter={value_repr(step_counter)}."
                ) from err
        if init_fn is not None and not callable(init_fn):
            raise ConfigError(
                f"`init_fn` must be callable or None; received init_fn={value_repr(init_fn)}."
            )
        for name, flag in (
            ("enable_async", enable_async),
            ("read_only", read_only),
            ("check_finite", check_finite),
        ):
            if not isinstance(flag, bool):
                raise ConfigError(f"`{name}` must be a bool; received {name}={value_repr(flag)}.")
        check_usable_directory(path, create=not read_only)
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
        # Steps whose save failed in a run of one process: their files go at `close()`.
        self._failed_steps: set[int] = set()
        self._read_only = read_only
        self._check_finite = check_finite
        # The directory's lock, held by the writing process (the chief of a run).
        self._lock: DirectoryLock | None = None
        self._unlock: Callable[[], Any] = lambda: None
        if not read_only and distributed.is_chief():
            self._lock = DirectoryLock.acquire_shared(path)
            # A manager dropped without `close()` no longer writes: its share goes with it.
            self._unlock = weakref.finalize(self, self._lock.release_shared)
            removed = remove_leftovers(path)
            if removed:
                _log.info("Removed what earlier runs left unfinished in %s: %s", path, removed)
        options = ocp.CheckpointManagerOptions(
            # Retention is looproto's (`_prune`): orbax would delete old steps even
            # when the new save failed in its background thread.
            max_to_keep=None,
            # Never orbax's own cleanup: it deletes every unfinished save, also one that
            # a live trainer is writing. The owner removes dead writers' leftovers above.
            cleanup_tmp_directories=False,
            create=not read_only,
            # No per-step metadata read at start: a step the owner deletes meanwhile
            # would fail the listing.
            lightweight_initialize=True,
            enable_async_checkpointing=enable_async,
        )
        try:
            self._manager: Any = retry_listing(
                lambda: ocp.CheckpointManager(
                    self._directory, options=options, item_handlers=self._item_handlers()
                )
            )
        except BaseException:
            self._release_lock()
            raise
        close_at_exit(self)

    def _release_lock(self) -> None:
        self._unlock()
        self._lock = None

    def _item_handlers(self) -> dict[str, Any]:
        return {
            STATE_ITEM: self._ocp.StandardCheckpointHandler(),
            META_ITEM: self._ocp.JsonCheckpointHandler(),
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
    def step_counter(self) -> Any:
        """The step counter checkpoints are numbered by, or None."""
        return self._step_counter

    @property
    def max_to_keep(self) -> int | None:
        """How many checkpoints are kept; None keeps all."""
        return self._max_to_keep

    @property
    def best_fn(self) -> str | BestFn | None:
        """What ranks checkpoints (None: they are kept by age alone)."""
        return self._best_fn

    @property
    def keep_best(self) -> int | None:
        """How many of the best checkpoints are kept besides the newest (None: no ranking)."""
        return self._keep_best

    @property
    def best_checkpoint(self) -> str | None:
        """Path of the best committed checkpoint by `best_fn`, or None (none scored).

        Example:
            >>> import tempfile
            >>> from looproto.module import Variable
            >>> w = Variable(np.zeros(2, np.float32))
            >>> manager = CheckpointManager(
            ...     tempfile.mkdtemp(), w, best_fn="eval_loss", best_mode="min", max_to_keep=1)
            >>> for step, loss in [(1, 0.5), (2, 0.2), (3, 0.9)]:
            ...     _ = manager.save(step, metrics={"eval_loss": loss})
            >>> [os.path.basename(p) for p in manager.checkpoints]  # the best and the newest
            ['2', '3']
            >>> os.path.basename(manager.best_checkpoint)
            '2'
            >>> manager.close()
        """
        if self._best_fn is None:
            return None
        newest_first = list(reversed(committed_steps(self._directory)))
        best = select(newest_first, self._scores_of(newest_first), 1, self._best_mode)
        return self._path(best[0]) if best else None

    @property
    def checkpoints(self) -> list[str]:
        """Paths of the committed checkpoints on disk, oldest first."""
        return [self._path(step) for step in committed_steps(self._directory)]

    @property
    def latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        step = latest_step(self._directory)
        return None if step is None else self._path(step)

    def _path(self, step: int) -> str:
        return os.path.join(self._directory, str(step))

    # ------------------------------------------------------------------ save

    def save(
        self,
        checkpoint_number: int | None = None,
        check_interval: bool = True,
        metrics: Any = None,
    ) -> str | None:
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
            metrics: An evaluation's output (a nested mapping of numbers) saved with the
                checkpoint and ranked by `best_fn`.

        Raises:
            CheckpointError: The manager is closed or read-only, the root holds nothing
                to save, a value cannot be stored, or an earlier asynchronous save failed.
            CheckpointStorageError: The save could not be written (a full disk, a
                directory that became unwritable) or this process no longer owns the
                directory; the previous checkpoints are kept.
            NonFiniteError: With `check_finite`, a variable holds NaN or infinity;
                nothing was written.
            ConfigError: `best_fn` cannot score `metrics`.
        """
        if self._closed:
            raise CheckpointError(
                f"`save()` called on a closed CheckpointManager ({self._directory})."
            )
        if self._read_only:
            raise CheckpointError(
                f"`save()` called on a read-only CheckpointManager ({self._directory}); "
                "create it without `read_only=True` to write checkpoints."
            )
        if self._checkpoint_interval is not None:
            current = read_int(self._step_counter)
            if self._last_checkpoint_step is not None:
                if current == self._last_checkpoint_step:
                    return None
                if (
                    check_interval
                    and current < self._last_checkpoint_step + self._checkpoint_interval
                ):
                    return None
            self._last_checkpoint_step = current
        on_disk = set(committed_steps(self._directory)) | set(self._manager.all_steps())
        if distributed.process_count() > 1:
            # Every process must take the same decision: on what the chief sees on disk
            # (another process may look after the chief already wrote this step).
            on_disk = set(distributed.all_gather(sorted(on_disk), "a checkpoint save")[0])
        if checkpoint_number is not None:
            step = read_int(checkpoint_number)
        elif self._step_counter is not None:
            step = read_int(self._step_counter)
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
        if not arrays and not meta["objects"]:
            raise CheckpointError(
                f"Not saving checkpoint {step} to {self._directory}: the root "
                f"{value_repr(self._checkpoint)} holds no variable or state that looproto "
                "finds, so the checkpoint would restore nothing. Pass the module (or a "
                "mapping of the objects) whose variables should be saved."
            )
        if metrics is not None:
            if not isinstance(metrics, Mapping):
                raise ConfigError(
                    f"`metrics` must be a mapping (an evaluation's output); received "
                    f"{value_repr(metrics)}."
                )
            meta["metrics"] = metrics_json(metrics)
            meta["crc32"] = json_crc32(meta)
            if self._best_fn is not None:  # a key that is not there fails here, not later
                self._scores[step] = score(self._best_fn, meta["metrics"], self._path(step))
        if self._check_finite:
            self._refuse_non_finite(arrays, step)
        ocp = self._ocp
        items: dict[str, Any] = {META_ITEM: ocp.args.JsonSave(meta)}
        if arrays:
            items[STATE_ITEM] = ocp.args.StandardSave(arrays)
        self._check_async_errors()
        multi = distributed.process_count() > 1
        if multi:
            check_replicas_agree(meta, step)
        try:
            if self._lock is not None:
                self._lock.verify()
            if writes_checkpoints():
                saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            else:
                saved = True
        except Exception as err:
            error = save_failure(err, f"Saving checkpoint {step} to {self._directory} failed")
            if multi:
                share_save_outcome(step, str(error))
            else:
                self._failed_steps.add(step)
            raise error from err
        if multi:
            share_save_outcome(step, None if saved else "orbax declined to save it")
        if not saved:
            _log.warning("orbax declined to save checkpoint %d in %s.", step, self._directory)
            return None
        if self._enable_async:
            self._pending_step = step
            wait_at_exit(self)
        else:
            self._prune()
        return self._path(step)

    def _collect(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Host copies of the root's arrays and the JSON item (`_state.collect`)."""
        return collect(self._checkpoint, step)

    def _remove_own_unfinished(self) -> None:
        """Removes what this owner's failed saves left (after orbax's threads stopped)."""
        if self._lock is None:
            return
        committed = set(committed_steps(self._directory))
        for step in self._failed_steps - committed:
            remove_unfinished(self._directory, step)
        self._failed_steps.clear()

    def _refuse_non_finite(self, arrays: dict[str, Any], step: int) -> None:
        bad = non_finite(arrays)
        if not bad:
            return
        path, count, size = bad[0]
        others = f" (and {len(bad) - 1} more variable(s))" if len(bad) > 1 else ""
        newest = latest_step(self._directory)
        kept = "No checkpoint exists yet" if newest is None else f"Checkpoint {newest} is kept"
        raise NonFiniteError(
            f"Not saving checkpoint {step}: variable {path!r} holds {count} NaN or infinite "
            f"value(s) of {size}{others}; training diverged. {kept} in {self._directory}."
        )

    # ------------------------------------------------------------------ async

    def _check_async_errors(self) -> None:
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        PENDING.discard(self)
        try:
            self._manager.wait_until_finished()
            # orbax logs a failed background commit instead of raising it.
            self._manager.check_for_errors()
        except Exception as err:
            if distributed.process_count() == 1:
                self._failed_steps.add(step)
            raise save_failure(
                err, f"The asynchronous save of checkpoint {step} to {self._directory} failed"
            ) from err
        if step not in committed_steps(self._directory):
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
        save that came out damaged. With `keep_best`, the best good ones are kept too.
        """
        if self._max_to_keep is None or self._lock is None:
            return  # The owner alone deletes (in a multi-process run: the chief).
        if self._keep_best is not None:
            self._prune_keeping_best()
            return
        steps = committed_steps(self._directory)
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
            delete_step(self._directory, step)
            self._verified.discard(step)
        if doomed:
            self._manager.reload()

    def _prune_keeping_best(self) -> None:
        """`_prune` when the `keep_best` best good checkpoints are kept besides the newest."""
        assert self._max_to_keep is not None
        assert self._keep_best is not None
        steps = committed_steps(self._directory)
        good = [step for step in reversed(steps) if self._looks_complete(step)]
        newest = good[: self._max_to_keep]
        if len(newest) < self._max_to_keep:
            return
        best = select(good, self._scores_of(good), self._keep_best, self._best_mode)
        keep = {*newest, *best}
        doomed = [step for step in steps if step not in keep and step < newest[-1]]
        for step in doomed:
            delete_step(self._directory, step)
            self._verified.discard(step)
            self._scores.pop(step, None)
        if doomed:
            self._manager.reload()

    def _scores_of(self, steps: list[int]) -> dict[int, float | None]:
        """`best_fn`'s score of each step (read from its JSON item once)."""
        assert self._best_fn is not None
        for step in steps:
            if step not in self._scores:
                metrics = read_metrics(self._path(step))
                try:
                    value = None if metrics is None else score(self._best_fn, metrics, "")
                except ConfigError:  # an older checkpoint without that key: kept by age
                    value = None
                self._scores[step] = value
        return {step: self._scores[step] for step in steps}

    def _looks_complete(self, step: int) -> bool:
        """Cheap check of a committed step: JSON item valid, array index lists every path.

        Reads two small JSON files, no array data (the CRC-32s are checked on restore).
        """
        if step in self._verified:
            return True
        if not looks_complete(self._path(step)):
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
            PENDING.discard(self)
            OPEN.discard(self)
            try:
                self._manager.close()
                # Only now: a failed save's other writer threads may run until orbax
                # closes (a full disk gets its space back when the run ends).
                self._remove_own_unfinished()
            finally:
                self._release_lock()

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

    def restore(
        self,
        checkpoint: str | int | os.PathLike[str],
        *,
        allow_missing: Sequence[str] | None = None,
    ) -> str:
        """Restores every variable and object state from a checkpoint; returns its path.

        Nothing is written unless the whole checkpoint matches the live tree and
        passes its integrity checks.

        Args:
            checkpoint: A step number, or a checkpoint path `<dir>/<step>` (which may
                be in another directory).
            allow_missing: Live paths or glob patterns the checkpoint may lack (they
                keep their live values); default: the manager's `allow_missing`.

        Raises:
            CheckpointError: There is no such checkpoint; it does not match the live
                variables (every differing path is listed); or it is unreadable or
                corrupted.
        """
        if self._closed:
            raise CheckpointError(
                f"`restore()` called on a closed CheckpointManager ({self._directory})."
            )
        patterns = self._allow_missing
        if allow_missing is not None:
            patterns = check_allow_missing(allow_missing)
        directory, step = self._locate(checkpoint)
        self.sync()
        self._restore_step(directory, step, patterns)
        return os.path.join(directory, str(step))

    def _locate(self, checkpoint: str | int | os.PathLike[str]) -> tuple[str, int]:
        if isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool):
            directory, step = self._directory, int(checkpoint)
        elif isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(checkpoint))
            directory, name = os.path.split(path)
            if not STEP_NAME.fullmatch(name):
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
        if step not in committed_steps(directory):
            raise CheckpointError(
                f"No checkpoint {step} in {directory}; committed steps there: "
                f"{committed_steps(directory)}."
            )
        return directory, step

    def _read(self, directory: str, step: int, **items: Any) -> Any:
        """One orbax restore; read failures become `CorruptCheckpointError`."""
        try:
            return self._manager.restore(
                step, directory=directory, args=self._ocp.args.Composite(**items)
            )
        except READ_ERRORS as err:
            raise CorruptCheckpointError(
                f"Checkpoint {os.path.join(directory, str(step))} is unreadable: "
                f"{type(err).__name__}: {err}"
            ) from err

    def _restore_step(
        self, directory: str, step: int, allow_missing: Sequence[str] | None = None
    ) -> None:
        where = os.path.join(directory, str(step))
        meta = self._read(directory, step, **{META_ITEM: self._ocp.args.JsonRestore()})[META_ITEM]
        tree, objects = parse_meta(meta, where)

        variables, live_objects = live_tree(self._checkpoint, objects, where)
        patterns = self._allow_missing if allow_missing is None else allow_missing
        check_matches(tree, objects, variables, live_objects, where, patterns)

        arrays: dict[str, Any] = {}
        if tree:
            arrays = dict(
                self._read(directory, step, **{STATE_ITEM: self._ocp.args.StandardRestore()})[
                    STATE_ITEM
                ]
            )
        check_arrays(arrays, tree, where)

        write_all(variables, arrays, live_objects, objects, where)

    def restore_or_initialize(self) -> str | None:
        """Restores the newest good checkpoint, or calls `init_fn` if there is none.

        A checkpoint that is unreadable or fails its integrity checks is renamed to
        `<step>.corrupted-<unix time>` (kept, but no longer listed, so later saves
        may reuse its step) with a warning naming it and the reason, and the one
        before it is tried; a `read_only` manager skips it without renaming it. A
        step that the directory's owner deletes while it is read is not damage: the
        newest step is tried again. A checkpoint that does not match the live variables
        raises instead (that is a code change, not damage). After a restore, the
        save interval counts from the restored step.

        Returns:
            The restored checkpoint's path, or None if `init_fn` ran (or nothing did).

        Raises:
            CheckpointError: The newest readable checkpoint does not match the live tree.
        """
        self.sync()
        tried: set[int] = set()
        while True:
            untried = [s for s in committed_steps(self._directory) if s not in tried]
            if not untried:
                break
            step = untried[-1]
            tried.add(step)
            try:
                self._restore_step(self._directory, step)
            except CorruptCheckpointError as err:
                if step not in committed_steps(self._directory):
                    # The owner's retention deleted it while this (reading) manager read
                    # it: not damage. The newest step is tried instead.
                    _log.info("Checkpoint %d was deleted while it was read; trying again.", step)
                    continue
                self._set_aside(step, err)
                continue
            agree_on_restore(step)
            self._last_checkpoint_step = step
            return self._path(step)
        agree_on_restore(None)
        if self._init_fn is not None:
            self._init_fn()
        return None

    def _set_aside(self, step: int, err: CheckpointError) -> None:
        """A damaged step: the owner renames it away; others only skip it."""
        if self._lock is None:
            _log.warning(
                "Skipping corrupted checkpoint %d in %s and trying the previous one (left "
                "in place: this manager does not own the directory): %s",
                step,
                self._directory,
                err,
            )
            return
        moved = quarantine(self._directory, step)
        self._verified.discard(step)
        self._scores.pop(step, None)
        self._manager.reload()
        _log.warning(
            "Skipping corrupted checkpoint %d in %s and trying the previous one%s: %s",
            step,
            self._directory,
            f" (moved it to {moved})" if moved else "",
            err,
        )

    def __repr__(self) -> str:
        best = "" if self._best_fn is None else f", keep_best={self._keep_best}"
        return (
            f"CheckpointManager(directory={self._directory!r}, max_to_keep={self._max_to_keep}, "
            f"checkpoint_interval={self._checkpoint_interval}{best})"
        )


# ----------------------------------------------------------------------------
# Checking the manager's arguments


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
