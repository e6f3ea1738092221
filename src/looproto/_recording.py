"""Private: summaries recorded inside steps (`looproto.summary.scalar`/`histogram`).

A step calls `summary.scalar("grad_norm", g)` wherever it is, compiled or not. The
value goes to the *recorder* of whatever runs the step:

* a backend's compiled loop pushes its own recorder while the step runs or is traced
  (`recording(recorder)`): it keeps each name's latest value on the device -- in the
  scan carry under JAX, in `tf.Variable`s under TensorFlow, as tensors under torch --
  and hands the values over once, when the loop returns (`deliver`);
* anywhere else (the NumPy backend, an eager step, an action on the host) the value
  is kept as it is, in the host's pending store.

The `Controller` takes what is pending after each inner loop and each evaluation
(`take`) and writes it with that loop's summaries when `summary_interval` says they are
due, at the loop's last step. A name keeps the value of the last step that recorded it:
with `summary_interval` a multiple of `steps_per_loop`, that is the value at the step
the summary is written at, as Orbit's `tf.summary` calls under `record_if` give.

Framework-free: a backend's recorder is any object with `record(kind, name, value)`.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

from looproto.errors import ProtocolError, value_repr

__all__ = [
    "HISTOGRAM",
    "KINDS",
    "SCALAR",
    "Recorder",
    "clear",
    "deliver",
    "pending",
    "record",
    "recording",
    "take",
]

SCALAR: Final = "scalar"
HISTOGRAM: Final = "histogram"
KINDS: Final = (SCALAR, HISTOGRAM)


class Recorder(Protocol):
    """Keeps the values a running step records (a backend's, while its loop runs)."""

    def record(self, kind: str, name: str, value: Any) -> None:
        """Keeps `value` (this step's) as the latest of `name`."""
        ...


# The recorders of the loops running now, innermost last. A plain list: a compiled
# torch step reads it, and Dynamo guards on it without a graph break.
_stack: list[Recorder] = []
# Host values, and those loops delivered: name -> (kind, value).
_pending: dict[str, tuple[str, Any]] = {}
_EMPTY: Final[Mapping[str, Any]] = types.MappingProxyType({})


def record(kind: str, name: Any, value: Any) -> None:
    """Records `value` under `name` with the running loop's recorder, or on the host.

    Raises:
        ProtocolError: `name` is not a non-empty string.
    """
    if not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/"):
        raise ProtocolError(
            f"A summary name must be a non-empty string that neither starts nor ends with "
            f"'/'; received name={value_repr(name)}."
        )
    if _stack:
        _stack[-1].record(kind, name, value)
    else:
        _pending[name] = (kind, value)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Makes `recorder` receive what steps record while the block runs."""
    _stack.append(recorder)
    try:
        yield recorder
    finally:
        _stack.pop()


def deliver(values: Mapping[str, tuple[str, Any]]) -> None:
    """Hands a loop's recorded values (name -> (kind, value)) to the host, once it returns."""
    _pending.update(values)


def pending() -> dict[str, tuple[str, Any]]:
    """What is pending now (a copy), without taking it."""
    return dict(_pending)


def take() -> Mapping[str, Any]:
    """Takes everything pending: name -> value, ready for `SummaryManager.write_summaries`."""
    if not _pending:  # the common case, once per inner loop: no allocation
        return _EMPTY
    taken = {name: value for name, (_, value) in _pending.items()}
    _pending.clear()
    return taken


def clear() -> None:
    """Drops what is pending (stale values from before a loop)."""
    if _pending:
        _pending.clear()
