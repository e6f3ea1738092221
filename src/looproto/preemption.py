"""Preemption: SIGTERM/SIGINT stop training cleanly at the next inner-loop boundary.

While `Controller.train()` or `train_and_evaluate()` runs (in the main thread), the
signals in `Controller(preemption_signals=...)` (default SIGTERM and SIGINT) are
handled by `watch()`. The first such signal only sets a flag: no I/O happens in the
handler. The Controller checks the flag after every inner loop (and after each
evaluation of `train_and_evaluate`); when it is set, it saves a checkpoint at the
current step, waits for the save to be on disk, closes the summary writers and raises
`Preempted`. The inner loop that was running when the signal came is finished, never
cut short: a compiled loop cannot be stopped half-way without losing its state.

`Preempted` is a `SystemExit` with exit status `EXIT_PREEMPTED` (75, `EX_TEMPFAIL`
of `sysexits.h`: "try again later"). A script that does not catch it therefore exits
with status 75 and no traceback, and `except Exception` blocks do not swallow it.
Running the same command again resumes from the checkpoint it saved.

A second signal while the first is being handled (say, a second Ctrl-C during a long
inner loop or a slow save) ends the process at once: the handler restores the
signal's default action and re-sends the signal to the process, so it dies of that
signal (a shell reports status 128 + N: 143 for SIGTERM, 130 for SIGINT). Nothing
more is written. A checkpoint save that was under way is then left as orbax's
temporary directory, which is never listed as a checkpoint and is deleted when the
next run takes over the directory, so the last good checkpoint stays the newest one.

Other sources of preemption notices (a cloud metadata poller, a cluster hook) can
call `request()` from any thread; the Controller then stops the same way.

Example:
    >>> from looproto import preemption
    >>> preemption.requested()
    False
    >>> preemption.request()  # e.g. from a thread that polls a preemption notice
    >>> preemption.requested()
    True
    >>> preemption.clear()
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Final

from looproto.errors import ConfigError, value_repr

__all__ = [
    "DEFAULT_SIGNALS",
    "EXIT_PREEMPTED",
    "Preempted",
    "acknowledge",
    "clear",
    "check_signals",
    "request",
    "requested",
    "signal_received",
    "watch",
]

_log = logging.getLogger("looproto")

EXIT_PREEMPTED: Final = 75
"""Exit status of a preempted run: `EX_TEMPFAIL` ("try again later") of `sysexits.h`."""

DEFAULT_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGINT)
"""The signals a `Controller` handles during training unless told otherwise."""

# Signals a process cannot catch: asking for them is a configuration error.
_UNCATCHABLE: Final = frozenset(
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


class Preempted(SystemExit):
    """Training stopped early on request; the state was saved. Run again to resume.

    A `SystemExit` whose `code` is `EXIT_PREEMPTED` (75), so an uncaught one ends
    the process with that status.

    Attributes:
        step: The global step training stopped at (-1 if unknown).
        signal_number: The signal that asked for the stop, or None for `request()`.
        checkpoint: The path of the checkpoint holding `step`, or None when there is
            no checkpoint manager.
    """

    def __init__(
        self, step: int, signal_number: int | None = None, checkpoint: str | None = None
    ) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.signal_number = signal_number
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        cause = (
            "a preemption request"
            if self.signal_number is None
            else (_signal_name(self.signal_number))
        )
        if self.checkpoint is None:
            saved = "no checkpoint was saved (the Controller has no checkpoint manager)"
        else:
            saved = f"saved checkpoint {self.checkpoint}; run again to resume"
        return f"training stopped by {cause} at step {self.step}: {saved}."

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.signal_number, self.checkpoint))


def _signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


class _State:
    """Process-wide, like signal dispositions themselves. Only plain assignments."""

    pending = False
    signal_number: int | None = None
    # Signals received since the handlers were installed; the second one exits.
    received = 0
    depth = 0


def requested() -> bool:
    """Whether a stop was asked for (a handled signal or `request()`) and not yet acted on."""
    return _State.pending


def signal_received() -> signal.Signals | None:
    """The signal behind the pending request, or None (none pending, or `request()`)."""
    if not _State.pending or _State.signal_number is None:
        return None
    try:
        return signal.Signals(_State.signal_number)
    except ValueError:  # pragma: no cover - a real-time signal without a name
        return None


def request() -> None:
    """Asks training to stop at the next inner-loop boundary, as a first signal would.

    Safe to call from any thread (only a flag is set).
    """
    _State.pending = True
    _State.signal_number = None


def acknowledge() -> None:
    """Marks the pending request as acted on (the `Controller` calls it as it stops).

    Unlike `clear()`, a further signal while the handlers are installed still counts
    as a second one and ends the process at once: the run is already stopping.
    """
    _State.pending = False
    _State.signal_number = None


def clear() -> None:
    """Forgets a pending request and the signals received, as if none had come."""
    _State.pending = False
    _State.signal_number = None
    _State.received = 0


def _handle(signal_number: int, frame: Any) -> None:
    # Runs in the main thread between two bytecodes: set flags only, no I/O, no locks
    # (the interrupted code may hold any lock, or be half-way through a write).
    _State.received += 1
    if _State.received >= 2:
        _exit_now(signal_number)
    _State.pending = True
    _State.signal_number = signal_number


def _exit_now(signal_number: int) -> None:
    """Dies of `signal_number` at once (its default action), writing nothing."""
    try:
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)
    finally:
        # Only reached if the default action did not end the process (e.g. it was
        # ignored by the parent): exit with the shell's status for that signal.
        os._exit(128 + signal_number)


def check_signals(signals: Any, argument: str = "preemption_signals") -> tuple[signal.Signals, ...]:
    """Validates a collection of signals to handle; returns them as `signal.Signals`.

    Args:
        signals: An iterable of signal numbers or `signal.Signals`, or None (none).
        argument: The argument name for error messages.

    Raises:
        ConfigError: `signals` is not an iterable of catchable signals.
    """
    if signals is None:
        return ()
    if isinstance(signals, (str, bytes)) or not isinstance(signals, Iterable):
        raise ConfigError(
            f"`{argument}` must be a sequence of signals (e.g. `(signal.SIGTERM,)`) or None; "
            f"received {argument}={value_repr(signals)}."
        )
    result: list[signal.Signals] = []
    for item in signals:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(
                f"`{argument}` must hold signal numbers such as `signal.SIGTERM`; received "
                f"{value_repr(item)} of type {type(item).__name__} in {argument}."
            )
        try:
            sig = signal.Signals(item)
        except ValueError:
            raise ConfigError(
                f"`{argument}` holds {item!r}, which is not a signal on this platform."
            ) from None
        if sig in _UNCATCHABLE:
            raise ConfigError(
                f"`{argument}` holds {sig.name}, which a process cannot catch; expected "
                "signals such as SIGTERM, SIGINT or SIGUSR1."
            )
        if sig not in result:
            result.append(sig)
    return tuple(result)


@contextlib.contextmanager
def watch(signals: Iterable[int] | None = DEFAULT_SIGNALS) -> Iterator[None]:
    """Handles `signals` as preemption requests for the duration of the block.

    The previous handlers are restored on exit. Nested blocks keep the outermost
    block's handlers. A signal the process ignores (`SIG_IGN`, as a shell sets SIGINT
    for a background job) stays ignored. In a thread other than the main one, Python cannot install
    signal handlers: the block then installs nothing (a signal has its usual
    effect), and only `request()` can stop training.

    Args:
        signals: The signals to handle; None or empty installs nothing.

    Raises:
        ConfigError: `signals` holds something that is not a catchable signal.
    """
    wanted = check_signals(signals, "signals")
    if not wanted:
        yield
        return
    if _State.depth > 0:
        _State.depth += 1
        try:
            yield
        finally:
            _State.depth -= 1
        return
    if threading.current_thread() is not threading.main_thread():
        _log.debug("Not in the main thread: signals are not handled as preemption requests.")
        yield
        return
    previous = {int(sig): signal.getsignal(sig) for sig in wanted}
    # An ignored signal stays ignored, as Python leaves an ignored SIGINT alone at
    # start-up: a shell starts background jobs with SIGINT ignored, for instance.
    ignored = [number for number, handler in previous.items() if handler is signal.SIG_IGN]
    if ignored:
        _log.debug("Signals %s are ignored by this process: left as they are.", ignored)
    _State.received = 0
    _State.depth = 1
    try:
        for sig in wanted:
            if int(sig) not in ignored:
                signal.signal(sig, _handle)
        yield
    finally:
        _State.depth = 0
        _State.received = 0
        for number, handler in previous.items():
            # getsignal() gives None for a handler installed from C; the closest
            # Python can restore is the default.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
