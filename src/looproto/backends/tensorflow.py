"""The TensorFlow backend: Orbit's `tf.function` + `tf.while_loop` inner loop.

Discovery finds `tf.Variable`s (distributed ones included), Keras 3 variables on
the TensorFlow backend, and the variables inside a `tf.Module`, a Keras layer or
model, or a Keras optimizer held as a module attribute. `Module.name_scope`
enters `tf.name_scope`, so a `tf.Variable` made in a module's scope is named
like `my_module/Variable:0`.

The inner loop (`make_loop`) has three forms, picked by `LoopOptions`:

* `compile_loop` (the default): one `tf.function` whose body is
  `for _ in tf.range(num_steps)` -- a `tf.while_loop` -- that pulls each batch
  from the `tf.data` iterator inside the graph and runs the step on it, through
  `strategy.run` under a multi-replica strategy. `num_steps` enters as an int64
  tensor, so a new step count does not retrace. This is Orbit's
  `create_tf_while_loop_fn`, and the path `TPUStrategy` needs.
* `compile_step` only (and always when a `reduce_fn` folds outputs into Python
  state): one `tf.function` call per step from a Python loop.
* neither: the step runs eagerly, as plain Python (for debugging).

In the compiled forms looproto pulls one batch per step (one `next()` per
iterator) and hands the step an iterator that yields exactly that batch. That is
what lets the loop count the steps that really ran when the data ends (the loop
stops cleanly and reports them), run the step per replica, and compile the step
with XLA.

A Python iterator (not `tf.data`) whose batches are arrays -- a
`looproto.data.ArrayDataset`'s, say -- runs in the compiled form too: the loop
pulls its `num_steps` batches on the host, stacks them, and one `tf.function`
call runs a `tf.while_loop` over the stacked steps (the JAX backend's `data="stack"`).
A new step count does not retrace; a new batch shape traces once. Other Python
iterators run one `tf.function` call per step (see the `data` option).

NumPy `looproto.Variable`s of the module (the global step from
`looproto.create_global_step()`, a model written against the array API, see
`looproto.portable`) are *lifted* while a loop runs: each is bound to a
`tf.Variable` twin, loaded with its value before the loop; inside the step
`.value` reads the twin and `assign` writes through to it, so the compiled step
updates it on every step; after the loop the values go back into the Variables
as NumPy arrays of their own dtype. This is what the JAX and PyTorch backends do
with such Variables, and it keeps checkpoints of one tree whatever backend wrote them.
(Not under a multi-replica strategy: there, state the step updates must be
`tf.Variable`s created under `strategy.scope()`, with the `aggregation` they need.)

`value_and_grad(fn, module)` differentiates `fn()` with respect to the module's
trainable variables on a `tf.GradientTape`, keyed by variable path, like the JAX
and PyTorch backends' helpers; `array_namespace()` is the Python array API on
TensorFlow tensors (`tf.experimental.numpy` plus the standard names it lacks).

Backend options (`StandardTrainerOptions(backend_options={...})`):

* `strategy`: a `tf.distribute.Strategy`. Default: `tf.distribute.get_strategy()`
  when the loop is built (the strategy whose `scope()` is active, else the
  default strategy).
* `wrap_strategy_run` (default True): under a multi-replica strategy, run the
  step once per replica with `strategy.run` and reduce its outputs. False: call
  the step in cross-replica context, Orbit's convention, where the step calls
  `strategy.run` itself.
* `output_reduction` (default `"mean"`): how per-replica step outputs are
  combined: `"mean"`, `"sum"` (`strategy.reduce`), `"first"` (the first local
  replica's value) or `"concat"` (`strategy.gather` along axis 0).
* `jit_compile` (default None): compile the step with XLA.
* `reduce_retracing` (default False): passed to every `tf.function`.
* `data` (default `"auto"`): how a Python iterator's batches reach the compiled
  loop. `"stack"`: pulled and stacked on the host, all steps in one call;
  `"step"`: one `tf.function` call per step, its batch pulled in Python;
  `"auto"`: `"stack"` for `looproto.data.ArrayDataset` iterators, else `"step"`.
  (`tf.data` iterators are always read inside the graph.)
"""

from __future__ import annotations

import base64
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np
import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.eager import context as tf_context

from looproto import _nest, distributed
from looproto.backends._feed import StepIterator
from looproto.backends.base import LoopOptions, ReduceFn, StepFn
from looproto.data import ArrayIterator
from looproto.errors import (
    ConfigError,
    DistributedError,
    LooprotoError,
    ProtocolError,
    ShapeError,
    value_repr,
)
from looproto.module import Module, Variable, hooks_gated, variables_by_path

__all__ = [
    "BACKEND",
    "TensorflowBackend",
    "TensorflowEngine",
    "TensorflowLoop",
    "TfDataIteratorState",
    "TraceSideEffectWarning",
    "array_namespace",
    "distribute_dataset",
    "grad",
    "initialize_distributed",
    "iterator_state",
    "value_and_grad",
]

_log = logging.getLogger("looproto")

_INT64_MAX: Final = int(np.iinfo(np.int64).max)
_REDUCTIONS: Final = ("mean", "sum", "first", "concat")
_OPTION_DEFAULTS: Final[dict[str, Any]] = {
    "strategy": None,
    "wrap_strategy_run": True,
    "output_reduction": "mean",
    "jit_compile": None,
    "reduce_retracing": False,
    "data": "auto",
}
_DATA_MODES: Final = ("auto", "stack", "step")
# Steps per compiled call when a stacked loop runs until the data ends (`num_steps=-1`).
_STACK_CHUNK: Final = 100

MSG_TRACE_SIDE_EFFECT: Final = (
    "Python code in a compiled TensorFlow step runs once per trace, not once per step, "
    "so this change will not repeat on later steps. Keep state that the step updates "
    "in a `tf.Variable` (for a step counter: `tf.Variable(0, dtype=tf.int64, "
    "trainable=False)`), or run the step eagerly with `use_compiled_step=False`."
)


class TraceSideEffectWarning(UserWarning):
    """A compiled step changed Python state while TensorFlow traced it."""


# ----------------------------------------------------------------------------
# Helpers


def _keras() -> Any:
    """The `keras` module when it is imported and runs on TensorFlow, else None."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        if keras.backend.backend() != "tensorflow":
            return None
    except AttributeError:  # pragma: no cover - a partial import
        return None
    return keras


def _is_keras_variable(obj: Any) -> bool:
    keras = _keras()
    return keras is not None and isinstance(obj, keras.Variable)


def _numpy_dtype(variable: Any) -> np.dtype[Any]:
    dtype = variable.dtype
    if isinstance(dtype, tf.DType):
        return np.dtype(dtype.as_numpy_dtype)
    return np.dtype(dtype)


def _keras_paths(obj: Any, variables: Iterable[Any]) -> list[tuple[tuple[Any, ...], Any]]:
    # Keras paths start with the owner's (auto-uniquified) name; drop it so keys are
    # relative to the attribute that holds the layer.
    own = {str(getattr(obj, "name", "")), str(getattr(obj, "name", "")).lower()}
    pairs = []
    for variable in variables:
        parts = tuple(str(getattr(variable, "path", variable.name)).split("/"))
        if len(parts) > 1 and parts[0] in own:
            parts = parts[1:]
        pairs.append((parts, variable))
    return pairs


def _iter_leaves(iterator: Any) -> list[Any]:
    """The iterators in a (nested) mapping/list/tuple of iterators, in `_nest` order."""
    return [leaf for _, leaf in _nest.flatten_with_paths(iterator)]


def _layout(iterator: Any) -> Any:
    """The nesting of `iterator` with its leaves replaced by None."""
    if isinstance(iterator, Mapping):
        return {key: _layout(iterator[key]) for key in _nest.sorted_keys(iterator)}
    if isinstance(iterator, (list, tuple)) and not hasattr(iterator, "_fields"):
        return type(iterator)(_layout(value) for value in iterator)
    return None


def _rebuild(layout: Any, leaves: Iterable[Any]) -> Any:
    """Fills `layout` (from `_layout`) with `leaves`, in order."""
    it = iter(leaves)

    def fill(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fill(value) for value in node)
        return next(it)

    return fill(layout)


def _is_tf_iterator(iterator: Any) -> bool:
    return isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator))


def _signature(leaves: Any) -> tuple[str, tuple[str, ...]]:
    """Structure and dtypes of a batch, ignoring shapes (what forces a new trace)."""
    structure = tf.nest.map_structure(lambda _: "*", leaves)
    dtypes = tuple(
        getattr(t.dtype, "name", str(t.dtype))
        for t in tf.nest.flatten(leaves, expand_composites=True)
    )
    return repr(structure), dtypes


def _looproto_error_in(err: BaseException) -> LooprotoError | None:
    """The first `LooprotoError` in `err`'s chain of causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, LooprotoError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class _OneBatchIterator(StepIterator):
    """A `StepIterator` that also answers `tf.data.Iterator`'s methods."""

    __slots__ = ()

    def __init__(self, step_name: str, batch: Any) -> None:
        super().__init__(step_name, _TWICE_HINT, batch)

    def get_next(self) -> Any:
        """`tf.data.Iterator.get_next`: the batch."""
        return next(self)

    def get_next_as_optional(self) -> Any:
        """`tf.data.Iterator.get_next_as_optional`: the batch, always present."""
        return tf.experimental.Optional.from_value(next(self))


_TWICE_HINT = (
    "The TensorFlow backend's compiled loop pulls one batch per step from each iterator; "
    "make one dataset element hold what a step needs (e.g. `dataset.batch(k)` or "
    "`tf.data.Dataset.zip`), or run eagerly with `use_compiled_step=False`."
)


def _python_loop(
    call: Callable[[Any], Any],
    iterator: Any,
    num_steps: int,
    state: Any,
    reduce_fn: ReduceFn | None,
) -> tuple[Any, int]:
    """`call(iterator)` until `num_steps` or the data ends (StopIteration or OutOfRange)."""
    step = 0
    try:
        while num_steps < 0 or step < num_steps:
            outputs = call(iterator)
            if reduce_fn is not None:
                state = reduce_fn(state, outputs)
            step += 1
    except (StopIteration, tf.errors.OutOfRangeError):
        _log.debug("The data iterator is exhausted after %d steps.", step)
    return state, step


def _pull_batches(leaves: list[Any], n: int) -> list[tuple[Any, ...]]:
    """Up to `n` steps' batches, one per iterator each; fewer when the data ends."""
    out: list[tuple[Any, ...]] = []
    try:
        for _ in range(n):
            out.append(tuple([next(leaf) for leaf in leaves]))
    except StopIteration:
        pass
    return out


def _segments(batches: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Runs of consecutive batches whose arrays have the same shapes and dtypes."""
    segments: list[list[tuple[Any, ...]]] = []
    previous: Any = None
    for batch in batches:
        key = tuple((np.shape(a), np.asarray(a).dtype.str) for a in tf.nest.flatten(batch))
        if segments and key == previous:
            segments[-1].append(batch)
        else:
            segments.append([batch])
            previous = key
    return segments


# ----------------------------------------------------------------------------
# Python side effects at trace time

_tracing = threading.local()


# ----------------------------------------------------------------------------
# Lifting: NumPy `looproto.Variable`s become `tf.Variable`s while a loop runs

# Every NumPy `looproto.Variable` a loop lifts gets one `tf.Variable` twin for its whole
# life: a `tf.function` captures the twin it saw when it traced, so a Variable's twin
# must never be replaced. (Weak keys: a twin goes when its Variable does.)
_twins: weakref.WeakKeyDictionary[Variable, tf.Variable] = weakref.WeakKeyDictionary()


def _is_liftable(obj: Any) -> bool:
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


def _bound_twin(variable: Variable) -> tf.Variable | None:
    """The twin `variable` is bound to while a loop runs, else None."""
    value = variable._value
    if isinstance(value, tf.Variable) and _twins.get(variable) is value:
        return value
    return None


class _Lifted:
    """The NumPy Variables of a loop's module, bound to their twins while the loop runs.

    Before the loop each twin is loaded with its Variable's array and the Variable is
    bound to it: reading `.value` gives the `tf.Variable`, and `assign` writes through
    to it (`_variable_assign_hook`), so a compiled step updates it on every step. After
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


_NOTHING_LIFTED: Final = _Lifted([])


def _write_through(variable: Variable, twin: tf.Variable, value: Any) -> None:
    """`variable.assign(value)` for a lifted Variable: `Variable.assign`'s rules, on the twin."""
    if isinstance(value, Variable):
        value = value.value
    dtype = _numpy_dtype(twin)
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


def _variable_assign_hook(variable: Variable, value: Any) -> bool | None:
    """`Variable._assign_hooks` entry: writes lifted Variables through to their twins.

    Outside a loop's lifting, catches `looproto.Variable.assign` while TensorFlow traces
    a function: a NumPy array cannot hold a graph tensor, and a Python-level assignment
    would run once per trace, not once per step.
    """
    if hooks_gated():  # inside another framework's compiler (torch.compile)
        return None
    twin = _bound_twin(variable)
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


if _variable_assign_hook not in Variable._assign_hooks:
    Variable._assign_hooks.append(_variable_assign_hook)


def _numeric_attributes(module: Any) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------
# The loop


class TensorflowLoop:
    """The inner loop built by `TensorflowBackend.make_loop` (see the module docstring).

    Attributes:
        trace_count: How many times the step has been traced (one per new input
            signature: a new batch shape, or a new iterator type).
        strategy: The `tf.distribute.Strategy` the loop runs under.
    """

    def __init__(
        self,
        step_fn: StepFn,
        module: Any,
        options: LoopOptions,
        settings: dict[str, Any],
    ) -> None:
        """Builds the loop; `settings` are the validated backend options."""
        self._step_fn = step_fn
        self._step_name = getattr(step_fn, "__qualname__", None) or value_repr(step_fn)
        self._module = module
        self._compile_step = bool(options.compile_step)
        self._compile_loop = bool(options.compile_loop) and self._compile_step
        strategy = settings["strategy"] or _engine_strategy() or tf.distribute.get_strategy()
        self.strategy: tf.distribute.Strategy = strategy
        self._default_strategy = strategy is tf.distribute.get_strategy() and not (
            tf.distribute.has_strategy()
        )
        self._replicas = int(strategy.num_replicas_in_sync)
        self._replicate = bool(settings["wrap_strategy_run"]) and not self._default_strategy
        self._reduction: str = settings["output_reduction"]
        self._jit_compile: bool | None = settings["jit_compile"]
        self._reduce_retracing = bool(settings["reduce_retracing"])
        self.trace_count = 0
        self._layout: Any = None
        self._signature: tuple[str, tuple[str, ...]] | None = None
        self._last_iterator: Any = None
        self._num_steps_cache: dict[int, tf.Tensor] = {}
        self._counter: tf.Variable | None = None
        self._warned_python_iterator = False
        self._batch_fn = self._function(self._step_on_batch, jit_compile=self._jit_compile or None)
        self._iterator_step_fn = self._function(self._iterator_step)
        self._loop_fn = self._function(self._while_loop)
        self._data: str = settings["data"]
        self._stacked_fn = self._function(self._stacked_loop_body)
        self._stacked_calls: dict[Any, Any] = {}

    # -- building blocks (run at trace time) ---------------------------------

    def _function(self, fn: Callable[..., Any], jit_compile: bool | None = None) -> Any:
        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=self._reduce_retracing)

    def _step_on_batch(self, leaves: tuple[Any, ...]) -> Any:
        # Traced: the user's step, on one batch per iterator.
        self._on_trace(leaves)
        before = _numeric_attributes(self._module)
        iterator = _rebuild(
            self._layout, [_OneBatchIterator(self._step_name, batch) for batch in leaves]
        )
        # Every op of the step waits for its batch: TensorFlow orders stateful ops only
        # per resource, so without this a `step.assign_add(1)` could run although the
        # iterator had ended.
        with tf.control_dependencies(tf.nest.flatten(leaves, expand_composites=True)):
            outputs = self._step_fn(iterator)
        self._check_side_effects(before)
        return outputs

    @tf.autograph.experimental.do_not_convert
    def _on_trace(self, leaves: Any) -> None:
        self.trace_count += 1
        signature = _signature(leaves)
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            raise ConfigError(
                "The dataset's element spec changed: the step was first traced for "
                f"structure {self._signature[0]} with dtypes {list(self._signature[1])}, "
                f"and now receives structure {signature[0]} with dtypes {list(signature[1])}. "
                "Only batch shapes may change between calls (each new shape traces once). "
                "Build a new trainer for a dataset of another structure or dtype."
            )

    @tf.autograph.experimental.do_not_convert
    def _check_side_effects(self, before: dict[str, Any]) -> None:
        after = _numeric_attributes(self._module)
        for key, old in before.items():
            new = after.get(key, old)
            if new is not old and new != old:
                warnings.warn(
                    f"`{self._step_name}` changed `self.{key}` from {value_repr(old)} to "
                    f"{value_repr(new)} while TensorFlow traced it. {MSG_TRACE_SIDE_EFFECT}",
                    TraceSideEffectWarning,
                    stacklevel=2,
                )

    @tf.autograph.experimental.do_not_convert
    def _run_batch(self, leaves: tuple[Any, ...]) -> Any:
        """One step on pulled batches: per replica under a strategy, outputs reduced."""
        if not self._replicate:
            return self._batch_fn(leaves)
        per_replica = self.strategy.run(self._batch_fn, args=(leaves,))
        return tf.nest.map_structure(self._reduce_leaf, per_replica)

    def _reduce_leaf(self, value: Any) -> Any:
        if not isinstance(value, tf.distribute.DistributedValues):
            return value
        strategy = self.strategy
        if self._reduction == "first":
            return strategy.experimental_local_results(value)[0]
        if self._reduction == "concat":
            return strategy.gather(value, axis=0)
        op = (
            tf.distribute.ReduceOp.MEAN if self._reduction == "mean" else tf.distribute.ReduceOp.SUM
        )
        return strategy.reduce(op, value, axis=None)

    @tf.autograph.experimental.do_not_convert
    def _pull(self, iterator: Any) -> tuple[Any, ...]:
        return tuple(next(it) for it in _iter_leaves(iterator))

    def _iterator_step(self, iterator: Any) -> Any:
        # Traced: pull one batch in the graph and run the step on it.
        return self._run_batch(self._pull(iterator))

    def _while_loop(self, iterator: Any, num_steps: tf.Tensor) -> None:
        # Traced: Orbit's loop. The counter is incremented only after the step's batch
        # arrived, so after an OutOfRange error it holds the steps that ran.
        counter = self._counter
        assert counter is not None
        counter.assign(0)
        for _ in tf.range(num_steps):
            leaves = self._pull(iterator)
            self._run_batch(leaves)
            with tf.control_dependencies(tf.nest.flatten(leaves, expand_composites=True)):
                counter.assign_add(1)

    def _stacked_loop_body(self, stacked: tuple[Any, ...]) -> None:
        # Traced: one step per slice along axis 0 of batches stacked on the host.
        length = tf.shape(tf.nest.flatten(stacked)[0])[0]
        for i in tf.range(length):
            self._run_batch(tf.nest.map_structure(lambda s, i=i: s[i], stacked))

    # -- calling ----------------------------------------------------------------

    def _num_steps_tensor(self, num_steps: int) -> tf.Tensor:
        tensor = self._num_steps_cache.get(num_steps)
        if tensor is None:
            if len(self._num_steps_cache) > 64:
                self._num_steps_cache.clear()
            with tf.init_scope():
                tensor = tf.constant(num_steps, dtype=tf.int64)
            self._num_steps_cache[num_steps] = tensor
        return tensor

    def _ensure_counter(self) -> tf.Variable:
        if self._counter is None:
            with tf.init_scope():
                self._counter = tf.Variable(
                    0,
                    dtype=tf.int64,
                    trainable=False,
                    name="looproto_steps_run",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
        return self._counter

    def _check_iterator(self, iterator: Any) -> bool:
        """Validates a new iterator; returns whether it is a `tf.data` iterator."""
        leaves = _iter_leaves(iterator)
        is_tf = all(_is_tf_iterator(it) for it in leaves)
        if iterator is self._last_iterator:
            return is_tf
        layout = _layout(iterator)
        if self._last_iterator is not None and layout != self._layout:
            raise ConfigError(
                f"The nesting of the datasets changed from {self._layout!r} to {layout!r}; "
                "build a new trainer for the new datasets."
            )
        if self._replicate and self._replicas > 1:
            plain = [it for it in leaves if not isinstance(it, tf.distribute.DistributedIterator)]
            if plain:
                raise ConfigError(
                    f"Under a strategy with {self._replicas} replicas the dataset must be "
                    "distributed; received an iterator of type "
                    f"{type(plain[0]).__name__}. Pass "
                    "`strategy.experimental_distribute_dataset(dataset)` (or "
                    "`strategy.distribute_datasets_from_function(fn)`) as the dataset."
                )
        self._layout = layout
        self._last_iterator = iterator
        return is_tf

    def __call__(
        self,
        iterator: Any,
        num_steps: int,
        state: Any = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Any, int]:
        """Runs up to `num_steps` steps (`-1`: until the data ends).

        Returns:
            `(state, steps_run)`. Fewer steps than asked means the data ended; the
            loop stops cleanly after the last complete step.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
            raise ConfigError(f"`num_steps` must be an int; received num_steps={num_steps!r}.")
        num_steps = int(num_steps)
        if num_steps == 0:
            return state, 0
        if num_steps < -1:
            raise ConfigError(
                f"`num_steps` must be > 0, or -1 to run until the data ends; "
                f"received num_steps={num_steps}."
            )
        lifted = self._lift()
        try:
            if not self._compile_step:
                return self._eager(iterator, num_steps, state, reduce_fn)
            return self._compiled(iterator, num_steps, state, reduce_fn)
        except _PEER_FAILURES as err:
            if distributed.process_count() < 2:
                raise
            where = "a collective operation of the compiled loop"
            raise distributed.peer_failure(err, where) from err
        except Exception as err:
            # AutoGraph re-raises what the traced step raised as a `StagingError`, with
            # the original as its context: give the caller looproto's own error back.
            original = _looproto_error_in(err)
            if original is None or original is err:
                raise
            raise original.with_traceback(original.__traceback__) from None
        finally:
            lifted.release()

    def _lift(self) -> _Lifted:
        """Binds the module's NumPy Variables to their `tf.Variable` twins (see `_Lifted`).

        Not under a multi-replica strategy: a plain twin would not be mirrored, and which
        replica's update to keep is the model's choice (`tf.Variable(aggregation=...)`).
        """
        if self._replicas > 1:
            return _NOTHING_LIFTED
        module = self._module
        if isinstance(module, Module):
            found = list(module._flatten(predicate=_is_liftable))
        else:
            found = list(variables_by_path(module, predicate=_is_liftable).values())
        return _Lifted(found) if found else _NOTHING_LIFTED

    def _compiled(
        self, iterator: Any, num_steps: int, state: Any, reduce_fn: ReduceFn | None
    ) -> tuple[Any, int]:
        if iterator is None:
            # No dataset: the step makes its own inputs.
            call = self._function_without_data()
            return _python_loop(lambda _: call(), None, num_steps, state, reduce_fn)
        is_tf = self._check_iterator(iterator)
        with self._scope():
            if not is_tf:
                if self._compile_loop and reduce_fn is None and self._stacks(iterator):
                    return state, self._stacked_loop(iterator, num_steps)
                return self._python_iterator_loop(iterator, num_steps, state, reduce_fn)
            if self._compile_loop and reduce_fn is None:
                return state, self._compiled_loop(iterator, num_steps)
            return _python_loop(self._iterator_step_fn, iterator, num_steps, state, reduce_fn)

    def _scope(self) -> Any:
        if self._default_strategy:
            return _NULL_SCOPE
        return self.strategy.scope()

    def _compiled_loop(self, iterator: Any, num_steps: int) -> int:
        counter = self._ensure_counter()
        steps = _INT64_MAX if num_steps < 0 else num_steps
        try:
            self._loop_fn(iterator, self._num_steps_tensor(steps))
        except tf.errors.OutOfRangeError:
            ran = int(counter.numpy())
            _log.debug("The data iterator is exhausted after %d steps.", ran)
            return ran
        return steps

    def _stacks(self, iterator: Any) -> bool:
        """Whether a Python iterator's batches are stacked into one compiled call."""
        if self._data == "auto":
            return all(isinstance(it, ArrayIterator) for it in _iter_leaves(iterator))
        return self._data == "stack"

    def _stacked_loop(self, iterator: Any, num_steps: int) -> int:
        """Pulls the loop's batches on the host, stacks them, runs them in one call.

        Consecutive batches of one shape form one segment (one call); a segment of a
        new shape traces once. Returns the steps that ran (fewer: the data ended).
        """
        leaves = _iter_leaves(iterator)
        total = 0
        while num_steps < 0 or total < num_steps:
            want = _STACK_CHUNK if num_steps < 0 else num_steps - total
            batches = _pull_batches(leaves, want)
            for segment in _segments(batches):
                self._run_stacked(segment)
            total += len(batches)
            if len(batches) < want:
                _log.debug("The data iterator is exhausted after %d steps.", total)
                break
        return total

    def _run_stacked(self, segment: list[tuple[Any, ...]]) -> None:
        structure = segment[0]
        flats = [tf.nest.flatten(batch) for batch in segment]
        stacked = [np.stack(column) for column in zip(*flats)]
        key = tuple((a.shape[1:], a.dtype.str) for a in stacked)
        call = self._stacked_calls.get(key)
        if call is None:
            # Any number of steps: the stacking axis is left unknown, so one trace serves.
            specs = [tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)) for a in stacked]
            call = self._stacked_fn.get_concrete_function(
                tf.nest.pack_sequence_as(structure, specs)
            )
            self._stacked_calls[key] = call
        call(tf.nest.pack_sequence_as(structure, [tf.constant(a) for a in stacked]))

    def _python_iterator_loop(
        self, iterator: Any, num_steps: int, state: Any, reduce_fn: ReduceFn | None
    ) -> tuple[Any, int]:
        if self._replicate and self._replicas > 1:  # pragma: no cover - caught earlier
            raise ConfigError("A multi-replica strategy needs a distributed tf.data dataset.")
        if self._compile_loop and reduce_fn is None and not self._warned_python_iterator:
            self._warned_python_iterator = True
            _log.warning(
                "The TensorFlow backend compiles the whole loop only for `tf.data` iterators; "
                "received a %s, so each step is one `tf.function` call with its batch pulled "
                "in Python. Pass a `tf.data.Dataset` to run all steps in one call.",
                type(iterator).__name__,
            )

        def call(it: Any) -> Any:
            leaves = tuple([next(leaf) for leaf in _iter_leaves(it)])
            return self._run_batch(leaves)

        return _python_loop(call, iterator, num_steps, state, reduce_fn)

    def _function_without_data(self) -> Callable[[], Any]:
        fn = getattr(self, "_no_data_fn", None)
        if fn is None:

            def no_data() -> Any:
                self.trace_count += 1
                before = _numeric_attributes(self._module)
                outputs = (
                    self.strategy.run(self._step_fn, args=(None,))
                    if self._replicate
                    else self._step_fn(None)
                )
                self._check_side_effects(before)
                if self._replicate:
                    outputs = tf.nest.map_structure(self._reduce_leaf, outputs)
                return outputs

            fn = self._function(no_data, jit_compile=self._jit_compile or None)
            self._no_data_fn = fn
        return fn

    def _eager(
        self, iterator: Any, num_steps: int, state: Any, reduce_fn: ReduceFn | None
    ) -> tuple[Any, int]:
        if not self._replicate:
            return _python_loop(self._step_fn, iterator, num_steps, state, reduce_fn)
        if iterator is not None:
            self._check_iterator(iterator)

        def call(it: Any) -> Any:
            if it is None:
                outputs = self.strategy.run(self._step_fn, args=(None,))
            else:
                leaves = tuple([next(leaf) for leaf in _iter_leaves(it)])
                outputs = self.strategy.run(self._eager_step_on_batch, args=(leaves,))
            return tf.nest.map_structure(self._reduce_leaf, outputs)

        with self._scope():
            return _python_loop(call, iterator, num_steps, state, reduce_fn)

    def _eager_step_on_batch(self, leaves: tuple[Any, ...]) -> Any:
        iterator = _rebuild(
            self._layout, [_OneBatchIterator(self._step_name, batch) for batch in leaves]
        )
        return self._step_fn(iterator)


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SCOPE: Final = _NullScope()


# ----------------------------------------------------------------------------
# Gradients over a Module


@tf.autograph.experimental.do_not_convert
def _grad_targets(module: Any) -> tuple[list[str], list[Any]]:
    """Paths and watchable variables of `module`'s trainable floating-point variables."""
    from looproto.module import is_trainable

    paths: list[str] = []
    targets: list[Any] = []
    for path, variable in variables_by_path(module, predicate=is_trainable).items():
        if isinstance(variable, Variable):
            target = _bound_twin(variable)
            if target is None:
                raise ProtocolError(
                    f"Trainable variable {path!r} is a `looproto.Variable` holding "
                    f"{type(variable.value).__name__}; TensorFlow differentiates "
                    "`tf.Variable`s. Inside the TensorFlow backend's loops NumPy Variables "
                    "are lifted into `tf.Variable`s; outside them, hold `tf.Variable`s."
                )
        elif _is_keras_variable(variable):
            target = variable.value  # The `tf.Variable` behind a Keras 3 variable.
        else:
            target = variable
        if target.dtype.is_floating or target.dtype.is_complex:
            paths.append(path)
            targets.append(target)
    return paths, targets


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable variables.

    The counterpart of `looproto.backends.jax.value_and_grad` and
    `looproto.backends.torch.value_and_grad`, on a `tf.GradientTape`: `fn` takes no
    arguments and reads the module's state, as a step does. Works eagerly and inside
    `tf.function`. The variables differentiated are the trainable floating-point
    `tf.Variable`s (Keras variables included) and, inside a loop of this backend, the
    lifted NumPy `looproto.Variable`s. Gradients are not all-reduced across replicas
    (under a `tf.distribute` strategy, reduce them as Orbit steps do).

    Args:
        fn: Returns a scalar loss, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or a container of them).
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`; `grads` maps each
        differentiated variable's path (as in `variables_by_path`) to its gradient, a
        dense tensor (zeros for a variable the loss does not depend on).

    Raises:
        ProtocolError: `fn` did not return a scalar (or a pair with `has_aux`), or a
            trainable `looproto.Variable` holds a NumPy array outside a loop.

    Example:
        >>> import tensorflow as tf, looproto
        >>> m = looproto.Module(name="m")
        >>> m.w = tf.Variable([1.0, 2.0])
        >>> loss, grads = value_and_grad(lambda: tf.reduce_sum(m.w**2), m)
        >>> float(loss), grads["w"].numpy().tolist()
        (5.0, [2.0, 4.0])
    """
    paths, targets = _grad_targets(module)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(targets)
        out = fn()
    if has_aux:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ProtocolError(
                f"With `has_aux=True`, `fn` must return `(loss, aux)`; received {value_repr(out)}."
            )
        loss, aux = out
    else:
        loss, aux = out, None
    if not tf.is_tensor(loss) or loss.shape.num_elements() != 1:
        raise ProtocolError(f"`fn` must return a scalar loss tensor; received {value_repr(loss)}.")
    grads = tape.gradient(loss, targets, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    result = {
        # An embedding lookup's gradient is `IndexedSlices`; the optimizers want dense ones.
        path: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for path, g in zip(paths, grads)
    }
    return ((loss, aux) if has_aux else loss), result


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads


# ----------------------------------------------------------------------------
# The Python array API on TensorFlow


class _ArrayNamespace:
    """The array API for TensorFlow tensors: `tf.experimental.numpy` plus the names it lacks.

    `tf.experimental.numpy` builds the same graph as the `tf.math` ops (measured: the
    same 82 ops for an MLP's training step, the same time per step), so it is used as
    is; the standard's names that it does not have are added here.
    """

    __array_api_version__ = "2023.12"

    def __init__(self) -> None:
        import tensorflow.experimental.numpy as tnp

        self._tnp = tnp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tnp, name)

    def __repr__(self) -> str:
        return "<array API namespace for TensorFlow (tf.experimental.numpy)>"

    @staticmethod
    def astype(x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
        """`x` cast to `dtype` (a NumPy dtype or a `tf.DType`)."""
        return tf.cast(x, dtype)

    @staticmethod
    def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
        """`arrays` joined along `axis` (None: flattened first)."""
        if axis is None:
            return tf.concat([tf.reshape(a, [-1]) for a in arrays], axis=0)
        return tf.concat(list(arrays), axis=axis)

    @staticmethod
    def permute_dims(x: Any, /, axes: tuple[int, ...]) -> Any:
        """`x` with its axes reordered as `axes`."""
        return tf.transpose(x, perm=axes)

    @staticmethod
    def matrix_transpose(x: Any, /) -> Any:
        """`x` with its last two axes swapped."""
        rank = len(x.shape)
        return tf.transpose(x, perm=[*range(rank - 2), rank - 1, rank - 2])

    @staticmethod
    def pow(x1: Any, x2: Any, /) -> Any:
        """`x1 ** x2`, elementwise."""
        return tf.pow(x1, x2)


_NAMESPACE: _ArrayNamespace | None = None


def array_namespace() -> Any:
    """The array API namespace of TensorFlow tensors (see `looproto.portable`)."""
    global _NAMESPACE
    if _NAMESPACE is None:
        _NAMESPACE = _ArrayNamespace()
    return _NAMESPACE


# ----------------------------------------------------------------------------
# Iterator positions in checkpoints

_warned_unsaved_iterators: set[type] = set()


class TfDataIteratorState:
    """The iterator-state protocol for a `tf.data` iterator.

    The state is TensorFlow's own serialisation of the iterator (its position, and the
    contents of any shuffle buffer), as base64 text, so checkpoints stay JSON and
    arrays only. Its size grows with the shuffle buffer: measured here, 4 KB for an
    unshuffled pipeline and 370 KB for a 1024-element buffer of 9-float examples
    (about 360 bytes an element, of which 36 are data).
    """

    def __init__(self, iterator: Any) -> None:
        self._iterator = iterator

    def get_state(self) -> dict[str, str]:
        """See `looproto.data.StatefulIterator`."""
        tensors = self._iterator._serialize_to_tensors()
        return {
            key: base64.b64encode(tf.io.serialize_tensor(value).numpy()).decode("ascii")
            for key, value in tensors.items()
        }

    def set_state(self, state: Mapping[str, str]) -> None:
        """See `looproto.data.StatefulIterator`."""
        if not isinstance(state, Mapping) or not all(isinstance(v, str) for v in state.values()):
            raise ConfigError(
                f"A `tf.data` iterator state must map names to base64 text; received "
                f"{value_repr(state)}."
            )
        tensors = {
            key: tf.io.parse_tensor(base64.b64decode(value), tf.variant)
            for key, value in state.items()
        }
        self._iterator._restore_from_tensors(tensors)


def iterator_state(obj: Any) -> TfDataIteratorState | None:
    """See `looproto.backends.base`: adapts `tf.data` iterators for checkpoints.

    A `tf.distribute` iterator has no such serialisation; its position is not saved
    (a warning says so once), and a resumed run starts that dataset over.
    """
    if isinstance(obj, tf.data.Iterator) and hasattr(obj, "_serialize_to_tensors"):
        return TfDataIteratorState(obj)
    if (
        isinstance(obj, tf.distribute.DistributedIterator)
        and type(obj) not in _warned_unsaved_iterators
    ):
        _warned_unsaved_iterators.add(type(obj))
        _log.warning(
            "The position of a `tf.distribute` dataset iterator cannot be saved in a "
            "checkpoint; a run resumed from it starts that dataset over. Make the "
            "dataset a function of the global step (e.g. `dataset.skip(...)` on "
            "restore) where the order matters."
        )
    return None


# ----------------------------------------------------------------------------
# Multi-worker: MultiWorkerMirroredStrategy

# How TensorFlow's collectives fail when a peer is gone (UNAVAILABLE: its heartbeats
# stopped) or silent (DEADLINE_EXCEEDED: the collective's timeout).
_PEER_FAILURES: Final = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
)


def _engine_strategy() -> tf.distribute.Strategy | None:
    """The strategy of the active looproto engine, when it is TensorFlow's."""
    engine = distributed.engine()
    return engine.strategy if isinstance(engine, TensorflowEngine) else None


class TensorflowEngine:
    """`looproto.distributed.Engine` on `MultiWorkerMirroredStrategy`.

    Made by `initialize_distributed`.

    Control messages use the key-value store of TensorFlow's coordination service,
    with the run's timeout. orbax does not see the workers, so the chief writes
    checkpoints (`collective_checkpoints` is False). `scope()` is the strategy's
    scope: variables made in it are mirrored on every worker.

    Attributes:
        strategy: The `tf.distribute.MultiWorkerMirroredStrategy`; the TensorFlow
            backend's loops run under it unless told otherwise.
    """

    backend = "tensorflow"
    collective_checkpoints = False

    def __init__(self, strategy: tf.distribute.Strategy, timeout: float) -> None:
        self.strategy = strategy
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec()
        self.process_index = int(
            multi_worker_util.id_in_cluster(spec, resolver.task_type, resolver.task_id)
        )
        self.process_count = int(
            sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
        )
        self.timeout = timeout

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        tf_context.context().set_config_key_value(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        ms = max(int(timeout * 1000), 1)
        return str(tf_context.context().get_config_key_value(key, timeout_in_ms=ms))

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        tf_context.context().delete_config_key_value(key)

    def scope(self) -> Any:
        """See `looproto.distributed.Engine`: `strategy.scope()`."""
        return self.strategy.scope()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: TensorFlow leaves the cluster at exit."""

    def __repr__(self) -> str:
        return f"TensorflowEngine(worker {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> TensorflowEngine:
    """Creates the `MultiWorkerMirroredStrategy` of `TF_CONFIG`, for `distributed.initialize`.

    A `MultiWorkerMirroredStrategy` whose scope is active is adopted instead. Else
    the strategy is created here, so call this before TensorFlow runs any op. The
    coordination service is configured first with `timeout` for every worker to
    register and for the shutdown barrier; the strategy's collectives get the same
    timeout (`CommunicationOptions(timeout_seconds=...)`). A worker that dies is
    reported by the coordination service's heartbeats (10 s).

    Raises:
        ConfigError: `TF_CONFIG` is not set (and no strategy is active).
    """
    current = tf.distribute.get_strategy()
    if isinstance(current, tf.distribute.MultiWorkerMirroredStrategy):
        return TensorflowEngine(current, timeout)
    env = distributed.environment("tensorflow")
    if env is None:
        raise ConfigError(
            "`TF_CONFIG` is not set: MultiWorkerMirroredStrategy reads the cluster and this "
            "worker's task from it. Launch with `looproto train CONFIG --num-processes N`, or "
            'set it: {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            '"index": i}}.'
        )
    context = tf_context.context()
    if context.coordination_service is None:
        # What the strategy would configure, plus timeouts: the default waits an hour
        # for a worker that never registers.
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec()
        jobs = [
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker")
            if job in spec.jobs
        ]
        ms = max(int(timeout * 1000), 1)
        context.configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            cluster_register_timeout_in_ms=ms,
            shutdown_barrier_timeout_in_ms=ms,
            coordinated_jobs=jobs,
        )
        # Without it the leader waits for absent workers forever (the timeout above
        # bounds only the other workers' registration).
        configured: Any = context.coordination_service
        configured.cluster_register_with_barrier = True
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (tf.errors.OpError, RuntimeError) as err:
        raise DistributedError(
            f"Worker {env.process_index} of {env.process_count} could not join the other "
            f"workers ({env.coordinator} leads) within {timeout:g} s: "
            f"{str(err).strip().splitlines()[0]}"
        ) from err
    return TensorflowEngine(strategy, timeout)


def distribute_dataset(dataset: tf.data.Dataset, strategy: Any = None) -> Any:
    """A dataset of *global* batches as `strategy`'s distributed dataset.

    Every worker runs the same pipeline (same order, same shuffling seed) and each
    replica takes its slice of every global batch: together the replicas see
    exactly the batches one process would, whatever the number of workers.

    Args:
        dataset: Batched with the global batch size, identically on every worker.
        strategy: Default: the active engine's strategy, else `tf.distribute.get_strategy()`.

    Returns:
        `dataset` itself under a one-replica strategy; else a distributed dataset
        (`strategy.distribute_datasets_from_function`).
    """
    strategy = strategy or _engine_strategy() or tf.distribute.get_strategy()
    replicas = int(strategy.num_replicas_in_sync)
    if replicas == 1:
        return dataset

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        workers = context.num_input_pipelines
        local = replicas // workers
        first = context.input_pipeline_id * local

        def replica_slices(*batch: Any) -> Any:
            def cut(t: tf.Tensor) -> tf.Tensor:
                n = tf.shape(t)[0]
                rows = [t[n * (first + r) // replicas : n * (first + r + 1) // replicas]
                        for r in range(local)]  # fmt: skip
                return tf.stack(rows) if local > 1 else rows[0][tf.newaxis]

            cut_batch = tf.nest.map_structure(cut, batch)
            return tf.data.Dataset.from_tensor_slices(cut_batch)

        sliced = dataset.flat_map(replica_slices)
        return sliced.map(lambda *b: b[0] if len(b) == 1 else b)

    return strategy.distribute_datasets_from_function(per_worker)


# ----------------------------------------------------------------------------
# The backend


def _check_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"Unknown TensorFlow `backend_options` {unknown}; expected some of "
            f"{sorted(_OPTION_DEFAULTS)}."
        )
    settings = {**_OPTION_DEFAULTS, **raw}
    strategy = settings["strategy"]
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise ConfigError(
            f"`strategy` must be a `tf.distribute.Strategy` or None; received "
            f"strategy={value_repr(strategy)}."
        )
    for key in ("wrap_strategy_run", "reduce_retracing"):
        if not isinstance(settings[key], bool):
            raise ConfigError(f"`{key}` must be a bool; received {key}={settings[key]!r}.")
    if settings["jit_compile"] is not None and not isinstance(settings["jit_compile"], bool):
        raise ConfigError(
            f"`jit_compile` must be a bool or None; received jit_compile="
            f"{settings['jit_compile']!r}."
        )
    if settings["data"] not in _DATA_MODES:
        raise ConfigError(
            f"`data` must be one of {list(_DATA_MODES)}; received data={settings['data']!r}."
        )
    if settings["output_reduction"] not in _REDUCTIONS:
        raise ConfigError(
            f"`output_reduction` must be one of {list(_REDUCTIONS)}; received "
            f"output_reduction={settings['output_reduction']!r}."
        )
    return settings


class TensorflowBackend:
    """See the module docstring."""

    name = "tensorflow"

    def version(self) -> str:
        """See base class."""
        return str(tf.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `tf.Variable` (distributed too) and Keras 3 variables on TF."""
        return isinstance(obj, tf.Variable) or _is_keras_variable(obj)

    def is_trainable(self, obj: Any) -> bool:
        """See base class."""
        return bool(getattr(obj, "trainable", False))

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: the variables of a `tf.Module`, Keras layer or Keras optimizer.

        `tf.Module` paths are its attribute paths (`("layers", 0, "w")`); Keras
        paths are the variables' `path` without the owner's own name
        (`("dense", "kernel")`).
        """
        if isinstance(obj, (tf.Variable, tf.Tensor)):
            return None
        if isinstance(obj, tf.Module):
            return list(obj._flatten(predicate=self.is_variable, with_path=True))
        keras = _keras()
        if keras is not None:
            if isinstance(obj, keras.layers.Layer):
                return _keras_paths(obj, obj.weights)
            if isinstance(obj, keras.optimizers.Optimizer):
                return _keras_paths(obj, obj.variables)
        return None

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class."""
        if isinstance(value, Variable):
            value = value.value
        if isinstance(value, tf.distribute.DistributedValues) and not isinstance(
            value, tf.Variable
        ):
            value = tf.distribute.get_strategy().experimental_local_results(value)[0]
        if hasattr(value, "numpy"):
            return np.array(value.numpy(), copy=True)
        return np.array(value, copy=True)

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class. Shape and dtype must match exactly (else `ShapeError`)."""
        if isinstance(variable, Variable):
            from looproto.backends import numpy as numpy_backend

            numpy_backend.BACKEND.assign(variable, np.asarray(array))
            return
        array = np.asarray(array)
        shape = tuple(int(d) for d in variable.shape)
        dtype = _numpy_dtype(variable)
        if shape != tuple(array.shape) or dtype != array.dtype:
            raise ShapeError(
                f"Cannot assign an array of shape {array.shape} and dtype {array.dtype} to "
                f"{variable.name!r} of shape {shape} and dtype {dtype}."
            )
        variable.assign(array)

    def to_host(self, tree: Any) -> Any:
        """See base class. Per-replica values come back stacked on a new axis 0."""
        return _nest.map_output(self._leaf_to_host, tree)

    def _leaf_to_host(self, value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues) and not isinstance(
            value, tf.Variable
        ):
            local = tf.distribute.get_strategy().experimental_local_results(value)
            return np.stack([np.asarray(t) for t in local])
        return _nest.to_numpy_leaf(value)

    def iterator_state(self, obj: Any) -> TfDataIteratorState | None:
        """See `looproto.backends.tensorflow.iterator_state`."""
        return iterator_state(obj)

    def name_scope(self, scope: str) -> Any:
        """See base class: `tf.name_scope(scope)` (absolute, since `scope` ends in `/`)."""
        return tf.name_scope(scope)

    def initialize_distributed(
        self, timeout: float = distributed.DEFAULT_TIMEOUT
    ) -> TensorflowEngine:
        """See `looproto.backends.tensorflow.initialize_distributed`."""
        return initialize_distributed(timeout)

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> TensorflowLoop:
        """See base class and the module docstring.

        Raises:
            ConfigError: An unknown or invalid `backend_options` entry.
            ProtocolError: `step_fn` is not callable.
        """
        if not callable(step_fn):
            raise ProtocolError(f"`step_fn` must be callable; received {value_repr(step_fn)}.")
        settings = _check_settings(options.backend_options)
        return TensorflowLoop(step_fn, module, options, settings)

    # The gradient helpers, also as methods (`backends.get("tensorflow").value_and_grad`).
    def value_and_grad(
        self, fn: Callable[[], Any], module: Any, has_aux: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """See `looproto.backends.tensorflow.value_and_grad`."""
        return value_and_grad(fn, module, has_aux=has_aux)

    def grad(self, fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
        """See `looproto.backends.tensorflow.grad`."""
        return grad(fn, module, has_aux=has_aux)

    def array_namespace(self) -> Any:
        """See `looproto.backends.tensorflow.array_namespace`."""
        return array_namespace()


BACKEND = TensorflowBackend()
