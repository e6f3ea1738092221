"""Python state that a compiled TensorFlow step changes while it is traced.

Python code in a `tf.function` runs once per trace, not once per step, so a step
that changes a Python number on its module (or assigns to a NumPy `looproto.Variable`
that is not lifted) would change it once only. The loop compares the module's
number-valued attributes around each trace and warns with `TraceSideEffectWarning`;
the lifting's assign hook warns the same way. The message and the warning class are
shared by both, so they live here.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import numpy as np

MSG_TRACE_SIDE_EFFECT: Final = (
    "Python code in a compiled TensorFlow step runs once per trace, not once per step, "
    "so this change will not repeat on later steps. Keep state that the step updates "
    "in a `tf.Variable` (for a step counter: `tf.Variable(0, dtype=tf.int64, "
    "trainable=False)`), or run the step eagerly with `use_compiled_step=False`."
)


class TraceSideEffectWarning(UserWarning):
    """A compiled step changed Python state while TensorFlow traced it."""


_tracing = threading.local()


def numeric_attributes(module: Any) -> dict[str, Any]:
    """Number-valued attributes of `module` (bools excluded: lazy-build flags are fine)."""
    try:
        items = vars(module).items()
    except TypeError:
        return {}
    return {
        key: value
        for key, value in items
        if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    }
