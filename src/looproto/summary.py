"""Writes nested dicts of metrics as TensorBoard event files, the way Orbit does.

`SummaryManager.write_summaries({"steps_per_second": 3.2, "eval": {"loss": 0.1}})`
writes the tag `steps_per_second` into `<summary_dir>/` and the tag `loss` into
`<summary_dir>/eval/`: every nested mapping is a sub-directory, which TensorBoard
shows as its own run, and the leaf key is the tag.

Events are written synchronously with tensorboardX's `EventsWriter` (no
background queue). After `flush()` every value written so far is in the event
file, visible to TensorBoard and safe from the process being killed; after
`sync()` (or `close()`) it is also `fsync`ed, safe from the machine going down.
The Controller flushes after every inner loop and syncs whenever it saves a
checkpoint, so the summaries a checkpoint's steps produced outlive a crash with it.
(An `fsync` costs about 0.1 ms on an idle disk and several ms on a busy one: too much
for every loop of a fast inner loop.) tensorboardX is imported on the first write, not
when this module is imported: it imports torch when torch is installed (about 1-2 s).
"""

from __future__ import annotations

import itertools
import os
import time
import types
import weakref
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from looproto import _recording, distributed
from looproto._nest import to_numpy_leaf
from looproto.errors import ConfigError, ProtocolError, value_repr

__all__ = ["SummaryManager", "histogram", "pending", "scalar"]

# Makes every event file name unique within a process even if `time_ns` repeats.
_FILE_COUNTER: Final = itertools.count()

# Directory names that would escape or alias `summary_dir`.
_BAD_DIR_NAMES: Final = frozenset({"", ".", ".."})

_Leaf = tuple[str, str, float | np.ndarray[Any, Any]]  # (relative dir, tag, value)


def _as_step(value: Any, name: str) -> int:
    """Converts a step (int, NumPy integer, `Variable`, framework scalar) to `int`."""
    if isinstance(value, (bool, str, bytes)):
        raise ConfigError(f"`{name}` must be an integer; received {name}={value!r}.")
    try:
        if hasattr(value, "numpy") and not isinstance(value, (int, np.generic)):
            array = np.asarray(value.numpy())
            if array.size != 1 or not np.issubdtype(array.dtype, np.integer):
                raise TypeError
            return int(array.reshape(()))
        if isinstance(value, (float, np.floating)):
            if not float(value).is_integer():
                raise TypeError
            return int(value)
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"`{name}` must be an integer or an integer scalar variable; "
            f"received {name}={value_repr(value)} of type {type(value).__name__}."
        ) from None


class SummaryManager:
    """Writes nested dicts of scalars and arrays to TensorBoard event files.

    Nested mappings become nested sub-directories of `summary_dir` (Orbit's
    convention), each its own TensorBoard run; the leaf key is the tag. A leaf
    with one element is written as a scalar, a leaf with more elements as a
    histogram. Directories and event files are created only when a first value
    is written into them, so a manager that is never written to creates nothing.

    Values are written synchronously: after `flush()` or `close()` they are on
    disk (fsynced) and TensorBoard sees them. Each event file gets a name unique
    to this process and moment, so several managers (or restarts) writing to the
    same directory never overwrite each other's files.

    Example:
        >>> import os, tempfile
        >>> import looproto
        >>> logdir = tempfile.mkdtemp()
        >>> step = looproto.create_global_step()
        >>> with SummaryManager(logdir, global_step=step) as summaries:
        ...     summaries.write_summaries({"loss": 0.5, "eval": {"accuracy": 0.9}})
        >>> sorted(os.listdir(logdir))  # `loss` at the root, `accuracy` in `eval/`
        ['eval', 'events.out.tfevents...']

    Args:
        summary_dir: Root directory of the event files, or None to disable the
            manager (every method is then a cheap no-op and nothing is created).
        global_step: The step used when `write_summaries` gets no `step`:
            a `looproto.Variable` or anything with `__int__` or `.numpy()`, read
            at every write.
        purge_step: If given, the first event written into each directory is a
            `SessionLog(START)` at this step. TensorBoard then discards the events
            at steps `>= purge_step` that earlier event files in that directory
            hold, e.g. those written after the last checkpoint by a run that
            crashed. Pass the first step the resumed run will write.
        all_processes: Write on every process of a multi-process run. By default
            only the chief (`looproto.distributed.is_chief()`, checked when the
            manager is created) writes, so a run has one set of event files; on
            the other processes the manager is disabled, as with `summary_dir=None`.

    Raises:
        ConfigError: If `summary_dir` is not a path or None, or `purge_step` is
            not an integer.
    """

    def __init__(
        self,
        summary_dir: str | os.PathLike[str] | None,
        *,
        global_step: Any = None,
        purge_step: int | None = None,
        all_processes: bool = False,
    ) -> None:
        if summary_dir is not None and not isinstance(summary_dir, (str, os.PathLike)):
            raise ConfigError(
                "`summary_dir` must be a path (str or os.PathLike) or None; received "
                f"summary_dir={value_repr(summary_dir)} of type {type(summary_dir).__name__}."
            )
        path = None if summary_dir is None else os.fspath(summary_dir)
        if isinstance(path, bytes):
            raise ConfigError(
                f"`summary_dir` must be a str path, not bytes; received summary_dir={path!r}."
            )
        self._summary_dir: str | None = path
        if not isinstance(all_processes, bool):
            raise ConfigError(
                "`all_processes` must be a bool; received "
                f"all_processes={value_repr(all_processes)}."
            )
        # Multi-process runs: one writer, the chief (the other processes' values are
        # the same replicated values, or the chief's view of them).
        self._enabled = path is not None and (all_processes or distributed.is_chief())
        self._global_step = global_step
        self._purge_step = None if purge_step is None else _as_step(purge_step, "purge_step")
        # Relative directory -> tensorboardX EventsWriter, created on first write.
        self._writers: dict[str, Any] = {}
        self._dirty: set[str] = set()
        # Of the directories written since the last `sync`, those flushed since.
        self._flushed: set[str] = set()
        self._purged: set[str] = set()  # directories that already got the purge event
        # Closes (flushes, fsyncs) the files of a manager that is never closed, at
        # garbage collection or interpreter exit, instead of a ResourceWarning.
        weakref.finalize(self, _close_writers, self._writers)

    @property
    def enabled(self) -> bool:
        """Whether summaries are written (False when `summary_dir` is None, or off the chief)."""
        return self._enabled

    @property
    def summary_dir(self) -> str | None:
        """The root directory of the event files, or None when disabled."""
        return self._summary_dir

    def write_summaries(self, summary_dict: Mapping[str, Any], step: int | None = None) -> None:
        """Writes every leaf of `summary_dict` at `step`.

        The whole dict is converted and checked before anything is written, so a
        bad leaf leaves the event files untouched. Values reach the disk at the
        next `flush()` or `close()` (or earlier, when the OS buffer fills).

        Args:
            summary_dict: A possibly nested mapping from names to numbers, NumPy
                arrays or framework arrays (jax, TensorFlow, torch). Nested
                mappings are sub-directories; leaves with one element are scalars,
                larger ones histograms (non-finite elements are left out of the
                histogram).
            step: The step of these values; defaults to `int(global_step)`.

        Raises:
            ProtocolError: If a leaf is not numeric, is empty, or a key is not a
                usable name. The message names the key path.
            ConfigError: If `step` is None and there is no `global_step`, or a
                step is not an integer.
        """
        if not self._enabled:
            return
        if not isinstance(summary_dict, Mapping):
            raise ProtocolError(
                "`summary_dict` must be a (possibly nested) mapping of names to numbers or "
                f"arrays; received {value_repr(summary_dict)} of type "
                f"{type(summary_dict).__name__}."
            )
        resolved_step = self._resolve_step(step)
        leaves: list[_Leaf] = []
        _collect(summary_dict, "", "", leaves)
        if not leaves:
            return
        tbx = _tensorboardx()
        wall_time = time.time()
        # One event per directory, holding all its values (TensorBoard reads each value
        # of a summary as its own tag): one record to checksum and write, not one a tag.
        values: dict[str, list[Any]] = {}
        for directory, tag, value in leaves:
            if isinstance(value, float):
                summary_value = tbx.Summary.Value(tag=tag, simple_value=value)
            else:
                summary_value = tbx.Summary.Value(tag=tag, histo=_histogram(tbx, value))
            values.setdefault(directory, []).append(summary_value)
        events = [
            (directory, tbx.Event(summary=tbx.Summary(value=directory_values),
                                  step=resolved_step, wall_time=wall_time))
            for directory, directory_values in values.items()
        ]  # fmt: skip
        for directory, event in events:
            self._writer(directory, tbx).write_event(event)
            self._dirty.add(directory)
            self._flushed.discard(directory)

    def flush(self) -> None:
        """Writes every value so far into the event files, visible to TensorBoard.

        The data is then in the operating system's hands: it survives the process
        being killed, not the machine going down (see `sync`). Costs nothing when
        nothing was written.
        """
        for directory in sorted(self._dirty - self._flushed):
            _flush_to_os(self._writers[directory])
            self._flushed.add(directory)

    def sync(self) -> None:
        """Like `flush`, and `fsync`s the files: durable even if the machine goes down."""
        for directory in sorted(self._dirty):
            self._writers[directory].flush()  # tensorboardX: file flush + fsync
        self._dirty.clear()
        self._flushed.clear()

    def close(self) -> None:
        """Syncs and closes every event file.

        The manager stays usable: a later write opens new event files. A manager
        that is never closed closes its files when it is garbage-collected or the
        interpreter exits.
        """
        # tensorboardX's close flushes and fsyncs each file.
        _close_writers(self._writers)
        self._dirty.clear()
        self._flushed.clear()

    def __enter__(self) -> SummaryManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SummaryManager(summary_dir={self._summary_dir!r})"

    def _resolve_step(self, step: Any) -> int:
        """Returns `step`, else the current value of `global_step`."""
        if step is not None:
            return _as_step(step, "step")
        if self._global_step is None:
            raise ConfigError(
                "`step` is None and the SummaryManager has no `global_step`; pass `step` "
                "to `write_summaries` or `global_step` to `SummaryManager`."
            )
        return _as_step(self._global_step, "global_step")

    def _writer(self, directory: str, tbx: _TensorboardX) -> Any:
        """Returns the event writer of `directory`, creating the directory and file."""
        writer = self._writers.get(directory)
        if writer is not None:
            return writer
        assert self._summary_dir is not None
        path = os.path.join(self._summary_dir, directory) if directory else self._summary_dir
        os.makedirs(path, exist_ok=True)
        suffix = f".{time.time_ns()}.{os.getpid()}.{next(_FILE_COUNTER)}"
        writer = tbx.EventsWriter(os.path.join(path, "events"), suffix)
        if self._purge_step is not None and directory not in self._purged:
            writer.write_event(
                tbx.Event(
                    step=self._purge_step,
                    wall_time=time.time(),
                    session_log=tbx.SessionLog(status=tbx.SessionLog.START),
                )
            )
            self._purged.add(directory)
        self._writers[directory] = writer
        return writer


def _flush_to_os(writer: Any) -> None:
    """Hands the writer's buffered bytes to the OS, without an `fsync`."""
    # tensorboardX's own flush always fsyncs; its file object flushes alone.
    file = getattr(getattr(writer, "_py_recordio_writer", None), "_writer", None)
    if file is not None and hasattr(file, "flush"):
        file.flush()
    else:  # another tensorboardX layout, or a remote file: its own (fsyncing) flush
        writer.flush()


def _close_writers(writers: dict[str, Any]) -> None:
    """Closes and forgets every writer in `writers`."""
    while writers:
        _, writer = writers.popitem()
        writer.close()


def _collect(tree: Mapping[Any, Any], directory: str, prefix: str, out: list[_Leaf]) -> None:
    """Appends `(directory, tag, value)` for every leaf of `tree`, checking each."""
    for key, value in tree.items():
        key_path = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ProtocolError(
                f"Summary names must be strings; received the key {key!r} of type "
                f"{type(key).__name__} at `{prefix.rstrip('/') or '<root>'}`."
            )
        if isinstance(value, Mapping):
            if key in _BAD_DIR_NAMES or "/" in key or os.sep in key:
                raise ProtocolError(
                    f"A nested summary dict becomes a sub-directory, so its key must be a "
                    f"plain directory name; received `{key_path}` ({key!r})."
                )
            _collect(value, f"{directory}/{key}" if directory else key, f"{key_path}/", out)
            continue
        try:
            array = to_numpy_leaf(value)
        except ProtocolError as err:
            raise ProtocolError(
                f"Summary values must be numbers or numeric arrays; received `{key_path}`="
                f"{value_repr(value)} of type {type(value).__name__}."
            ) from err
        array = np.asarray(array)
        if array.size == 0:
            raise ProtocolError(
                f"Summary values must have at least one element; received `{key_path}` "
                f"with shape {array.shape}."
            )
        if np.iscomplexobj(array):
            raise ProtocolError(
                f"Summary values must be real numbers; received `{key_path}` of dtype "
                f"{array.dtype}."
            )
        if array.size == 1:
            out.append((directory, key, float(array.reshape(()))))
        else:
            out.append((directory, key, array.astype(np.float64).reshape(-1)))


class _TensorboardX:
    """The few tensorboardX names this module uses, imported on first use."""

    def __init__(self) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import HistogramProto, Summary
        from tensorboardX.summary import make_histogram

        self.EventsWriter = EventsWriter
        self.Event = Event
        self.SessionLog = SessionLog
        self.HistogramProto = HistogramProto
        self.Summary = Summary
        self.make_histogram = make_histogram
        # TensorBoard's default buckets (as `SummaryWriter.add_histogram` makes them).
        positive = []
        edge = 1e-12
        while edge < 1e20:
            positive.append(edge)
            edge *= 1.1
        self.default_bins = np.array([-e for e in reversed(positive)] + [0.0] + positive)


_TBX: _TensorboardX | None = None


def _tensorboardx() -> _TensorboardX:
    """Imports tensorboardX on first use (it imports torch when installed)."""
    global _TBX
    if _TBX is None:
        _TBX = _TensorboardX()
    return _TBX


def _histogram(tbx: _TensorboardX, values: np.ndarray[Any, Any]) -> Any:
    """Returns a `HistogramProto` of the finite elements of `values`."""
    finite = values[np.isfinite(values)]
    if finite.size:
        try:
            return tbx.make_histogram(finite, bins=tbx.default_bins)
        except ValueError:  # every element beyond the +-1e20 buckets
            pass
    return tbx.HistogramProto(
        min=float(finite.min()) if finite.size else 0.0,
        max=float(finite.max()) if finite.size else 0.0,
        num=float(finite.size),
        sum=float(finite.sum()),
        sum_squares=float(finite @ finite),
    )


# ----------------------------------------------------------------------------
# Summaries recorded inside steps


def scalar(name: str, value: Any) -> None:
    """Records a scalar summary from inside a step (or anywhere on the host).

    Call it in `train_step`/`eval_step` on any backend, compiled or not: the running
    loop keeps the latest value on the device (in the compiled call's carried state
    under JAX, in a `tf.Variable` under TensorFlow, as a tensor under torch) and hands
    it over when the inner loop returns. The `Controller` then writes it, with the
    loop's other summaries, at the loop's last step when `summary_interval` says
    summaries are due (train steps into the train summaries, eval steps into the eval
    summaries). A name recorded several times in a loop keeps its last value: with
    `summary_interval` a multiple of `steps_per_loop`, the value of the step the summary
    is written at. Values recorded outside a loop (in an action, say) are written with
    the next summaries the Controller writes.

    Example:
        >>> import looproto
        >>> class Trainer(looproto.StandardTrainer):
        ...     def __init__(self):
        ...         super().__init__(train_dataset=None)
        ...         self.global_step = looproto.create_global_step()
        ...     def train_step(self, iterator):
        ...         looproto.summary.scalar("step_seen", self.global_step.value)
        ...         self.global_step.assign_add(1)
        >>> _ = Trainer().train(3)
        >>> int(looproto.summary.pending()["step_seen"])  # the loop's last step
        2

    Args:
        name: The tag (`/` groups tags in TensorBoard, e.g. `"grads/norm"`).
        value: A number or a one-element array of the step's framework.

    Raises:
        ProtocolError: `name` is not a non-empty string.
    """
    _recording.record(_recording.SCALAR, name, value)


def histogram(name: str, values: Any) -> None:
    """Records a histogram summary of `values` (an array) from inside a step.

    Kept and written as `scalar` is; a one-element array is written as a scalar.

    Raises:
        ProtocolError: `name` is not a non-empty string.
    """
    _recording.record(_recording.HISTOGRAM, name, values)


def pending() -> dict[str, Any]:
    """The recorded values the Controller has not written yet: name -> value.

    Values stay as recorded (framework arrays too); `Controller` takes and writes them.
    """
    return {name: value for name, (_, value) in _recording.pending().items()}
