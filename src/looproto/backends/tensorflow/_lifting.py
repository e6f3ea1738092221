"""Lifting: NumPy `looproto.Variable`s become `tf.Variable`s while a loop runs.

Each NumPy Variable of a loop's module is bound to one `tf.Variable` twin for the
loop's duration (`Lifted`), so a compiled step reads and updates it; afterwards its
value goes back as a NumPy array. The twins (`_twins`) and the assign hook that
writes through to them (`variable_assign_hook`, the backend's `on_assign`) are
module-level state. The gradient helpers differentiate the bound twins (`bound_twin`).
TensorFlow converts a `looproto.Variable` to a tensor by its current value
(`_variable_to_tensor`): the twin while it is bound, so a graph reads it at every step.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Final

import numpy as np
import tensorflow as tf

from looproto import backends
from looproto.backends.tensorflow._side_effects import (
    MSG_TRACE_SIDE_EFFECT,
    TraceSideEffectWarning,
)
from looproto.backends.tensorflow._variables import variable_dtype
from looproto.errors import ProtocolError, ShapeError, value_repr
from looproto.module import Variable

# Every NumPy `looproto.Variable` a loop lifts gets one `tf.Variable` twin for its whole
# life: a `tf.function` captures the twin it saw when it traced, so a Variable's twin
# must never be replaced. (Weak keys: a twin goes when its Variable does.)
_twins: weakref.WeakKeyDictionary[Variable, tf.Variable] = weakref.WeakKeyDictionary()


def is_liftable(obj: Any) -> bool:
    """A plain `looproto.Variable` holding a numeric NumPy array (not a subclass's view)."""
    if type(obj) is not Variable:
        return False
    value = obj._value
    return isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc"


def _twin_of(variable: Variable) -> tf.Variable:
    twin = _twins.get(variable)
    if twin is None:
        value = variable._value
        with tf.init_scope():  # Created eagerly, even if a trace is running.
            twin = tf.Variable(
                np.asarray(value),
                trainable=variable.trainable,
                name=variable.name.rpartition(":")[0].replace("/", "_") or "lifted",
            )
        _twins[variable] = twin
    return twin


def bound_twin(variable: Variable) -> tf.Variable | None:
    """The twin `variable` is bound to while a loop runs, else None."""
    value = variable._value
    if isinstance(value, tf.Variable) and _twins.get(variable) is value:
        return value
    return None


class Lifted:
    """The NumPy Variables of a loop's module, bound to their twins while the loop runs.

    Before the loop each twin is loaded with its Variable's array and the Variable is
    bound to it: reading `.value` gives the `tf.Variable`, and `assign` writes through
    to it (`variable_assign_hook`), so a compiled step updates it on every step. After
    the loop the twins' values go back into the Variables as NumPy arrays of their own
    dtype, so the Controller, summaries and checkpoints see host values, as on every
    other backend.
    """

    def __init__(self, variables: list[Variable]) -> None:
        self.variables = variables
        self.originals = [v._value for v in variables]
        self.twins = [_twin_of(v) for v in variables]
        for twin, value in zip(self.twins, self.originals):
            twin.assign(value)
        for variable, twin in zip(variables, self.twins):
            variable._value = twin

    def release(self) -> None:
        """Writes the twins' values back (the originals if they cannot be read)."""
        values = list(self.originals)
        try:
            for i, (twin, original) in enumerate(zip(self.twins, self.originals)):
                array = np.asarray(twin.numpy()).astype(original.dtype, copy=False)
                values[i] = array[()] if isinstance(original, np.generic) else array
        finally:
            for variable, value in zip(self.variables, values):
                variable._value = value


NOTHING_LIFTED: Final = Lifted([])


def _write_through(variable: Variable, twin: tf.Variable, value: Any) -> None:
    """`variable.assign(value)` for a lifted Variable: `Variable.assign`'s rules, on the twin."""
    if isinstance(value, Variable):
        value = value.value
    dtype = variable_dtype(twin)
    shape = tuple(int(d) for d in twin.shape)
    if isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_symbolic_tensor(value):
        got = np.dtype(value.dtype.as_numpy_dtype)
        if got != dtype:
            raise ShapeError(
                f"Cannot assign a value of dtype {got} to variable {variable.name!r} of dtype "
                f"{dtype}: cast it first (e.g. `tf.cast(value, {dtype.name})`)."
            )
        if not value.shape.is_compatible_with(shape):
            raise ShapeError(
                f"Cannot assign a value of shape {tuple(value.shape)} to "
                f"variable {variable.name!r} of shape {shape}: the shape of a variable is fixed "
                "when it is created."
            )
        twin.assign(value)
        return
    array = np.asarray(value)
    if array.dtype != dtype:
        # Numbers and lists cast when safe; arrays must have the variable's dtype.
        if isinstance(value, np.ndarray) or not np.can_cast(array.dtype, dtype, "same_kind"):
            raise ShapeError(
                f"Cannot assign {value_repr(value)} (dtype {array.dtype}) to variable "
                f"{variable.name!r} of dtype {dtype}: expected a value of that dtype."
            )
        array = array.astype(dtype)
    if array.shape != shape:
        raise ShapeError(
            f"Cannot assign a value of shape {array.shape} to variable {variable.name!r} of "
            f"shape {shape}: the shape of a variable is fixed when it is created."
        )
    twin.assign(array)


def variable_assign_hook(variable: Variable, value: Any) -> bool | None:
    """The backend's `on_assign`: writes lifted Variables through to their twins.

    Outside a loop's lifting, catches `looproto.Variable.assign` while TensorFlow traces
    a function: a NumPy array cannot hold a graph tensor, and a Python-level assignment
    would run once per trace, not once per step.
    """
    if backends.hooks_gated():  # inside another framework's compiler (torch.compile)
        return None
    twin = bound_twin(variable)
    if twin is not None:
        _write_through(variable, twin, value)
        return True
    if not tf.inside_function():
        return None
    if isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_symbolic_tensor(value):
        raise ProtocolError(
            f"A compiled TensorFlow step assigned a graph tensor to {variable.name!r}, a "
            "`looproto.Variable` holding a NumPy array. The loop lifts the NumPy Variables of "
            "its trainer or evaluator into `tf.Variable`s, but not this one: it is not "
            "reachable from the module, or the loop runs under a multi-replica strategy "
            "(create `tf.Variable`s under `strategy.scope()` there). Others cannot be updated "
            f"from inside `tf.function`. {MSG_TRACE_SIDE_EFFECT}"
        )
    warnings.warn(
        f"{variable.name!r} (a `looproto.Variable` holding a NumPy array) was assigned while "
        f"TensorFlow traced a function. {MSG_TRACE_SIDE_EFFECT}",
        TraceSideEffectWarning,
        stacklevel=3,
    )
    return None


def _variable_to_tensor(
    value: Variable, dtype: Any = None, name: str | None = None, as_ref: bool = False
) -> Any:
    # The value now: a lifted Variable's twin inside a loop (read in the graph, at every
    # step), its array elsewhere. Without this, TensorFlow converts a `Variable` through
    # `__array__`, which freezes its value into the graph being traced.
    return tf.convert_to_tensor(value.value, dtype=dtype, name=name)


# TensorFlow ops (`tf.summary.scalar(..., step=global_step)`, `tf.add(v, 1)`) take a
# `looproto.Variable` as they take a `tf.Variable`.
tf.register_tensor_conversion_function(Variable, _variable_to_tensor)
