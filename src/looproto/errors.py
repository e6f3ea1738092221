"""looproto's exception family.

Every error looproto raises on bad input is one of these, so callers can catch
`LooprotoError` alone, or the builtin it subclasses (`ValueError`, `TypeError`,
`ImportError`) where code written for Orbit or tf.Module expects that.

Messages follow one formula: the argument in backticks, the value received, what
was expected, and (where there is one) the fix.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendNotAvailableError",
    "CheckpointError",
    "CheckpointStorageError",
    "ConfigError",
    "DistributedError",
    "LooprotoError",
    "NonFiniteError",
    "ProtocolError",
    "ShapeError",
    "StaleReadError",
    "StorageError",
    "value_repr",
]


class LooprotoError(Exception):
    """Base class of every error looproto raises on purpose."""


class ConfigError(LooprotoError, ValueError):
    """An argument or configuration value is invalid."""


class ProtocolError(LooprotoError, TypeError):
    """An object does not follow the contract looproto expects of it.

    For example a `train_step` that returns something other than arrays, or a
    decorator applied to something that is not a method.
    """


class StaleReadError(ProtocolError):
    """A compiled step read a variable that its loop does not carry.

    Its value at the first trace would be baked into the compiled program as a
    constant and never change again; the message names the variable and how to make
    it reachable from the trainer or evaluator.
    """


class ShapeError(LooprotoError, ValueError):
    """An array has the wrong shape or dtype for the variable it should go into."""


class CheckpointError(LooprotoError, ValueError):
    """A checkpoint cannot be written, read, or does not match the module tree."""


class StorageError(LooprotoError, OSError):
    """A file or directory looproto must read or write cannot be used.

    The environment, not the program, is at fault: a directory that is not writable,
    a file or a dangling symbolic link where a directory should be, a full disk, or a
    checkpoint directory that another live process owns. `looproto` exits with status
    4 for it.
    """


class CheckpointStorageError(CheckpointError, StorageError):
    """A checkpoint could not be written or its directory used (both kinds of error)."""


class NonFiniteError(LooprotoError, FloatingPointError):
    """Training produced NaN or infinite values; nothing non-finite was saved.

    Raised by `Controller(check_finite=True)` for a train output and by
    `CheckpointManager(check_finite=True)` for a variable about to be saved, so that a
    diverged run never replaces a good checkpoint. `looproto` exits with status 5.
    """


class BackendNotAvailableError(LooprotoError, ImportError):
    """A backend was asked for whose framework is not installed."""


class DistributedError(LooprotoError, RuntimeError):
    """The processes of a multi-process run lost each other or disagree.

    Raised when another process died or stopped responding within the run's
    timeout, or when processes that must agree (on the global step, on the
    checkpoint to restore, on the values a checkpoint holds) do not.
    """


def value_repr(value: Any, limit: int = 80) -> str:
    """Returns a short `repr` of `value` for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
