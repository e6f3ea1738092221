"""Private: argument checks shared by the public API, with one message formula.

Every check raises `ConfigError` naming the argument, the value received and what
was expected: "`max_to_keep` must be a positive int or None; received max_to_keep=0."
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from looproto.errors import ConfigError, value_repr

__all__ = ["is_int", "positive_int", "positive_number"]


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, argument: str, *, allow_none: bool = False, hint: str = "") -> Any:
    """Returns `value` if it is a positive int (or None, with `allow_none`).

    Args:
        value: What was passed.
        argument: Its name, as the caller wrote it.
        allow_none: None is accepted too.
        hint: Words added after the expectation (" (keep all)").

    Raises:
        ConfigError: Anything else.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "") + hint
        raise ConfigError(
            f"`{argument}` must be {expected}; received {argument}={value_repr(value)}."
        )
    return value


def positive_number(value: Any, argument: str, *, unit: str = "") -> float:
    """Returns `value` as a float if it is a finite positive int or float.

    Raises:
        ConfigError: Anything else (NaN and infinity included).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ConfigError(
            f"`{argument}` must be a positive number{unit}; "
            f"received {argument}={value_repr(value)}."
        )
    return float(value)
