"""`TensorflowLoop`: the inner loop that `TensorflowBackend.make_loop` builds.

The loop's three forms (a `tf.while_loop` in one `tf.function`, one `tf.function`
call per step, or eager Python), its runs over stacked host batches, its
per-replica runs and output reductions under a `tf.distribute` strategy, and the
Python loop that drives the per-step forms (`_python_loop`). "The module docstring"
in its docstrings is the package's, `looproto.backends.tensorflow`, which describes
the forms and the options. The batch plumbing is in `batches.py`, the lifting of
NumPy Variables in `lifting.py`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import tensorflow as tf

from looproto import _recording, distributed
from looproto.backends._common import run_python_loop
from looproto.backends.base import LoopOptions, ReduceFn, StepFn
from looproto.backends.tensorflow._batches import (
    OneBatchIterator,
    batch_signature,
    is_tf_iterator,
    iter_leaves,
    nest_layout,
    pull_batches,
    rebuild_nest,
    same_signature_runs,
)
from looproto.backends.tensorflow._distributed import PEER_FAILURES, engine_strategy
from looproto.backends.tensorflow._lifting import NOTHING_LIFTED, Lifted, is_liftable
from looproto.backends.tensorflow._side_effects import (
    MSG_TRACE_SIDE_EFFECT,
    TraceSideEffectWarning,
    numeric_attributes,
)
from looproto.backends.tensorflow._stale import refusing_stale_reads
from looproto.backends.tensorflow._summaries import SummarySlots
from looproto.data import ArrayIterator
from looproto.errors import ConfigError, LooprotoError, value_repr
from looproto.module import Module, variables_by_path

_log = logging.getLogger("looproto")

_INT64_MAX: Final = int(np.iinfo(np.int64).max)
# Steps per compiled call when a stacked loop runs until the data ends (`num_steps=-1`).
_STACK_CHUNK: Final = 100


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


# What ends a per-step loop: a Python iterator's StopIteration, a tf.data iterator's
# OutOfRangeError.
_END_OF_DATA = (StopIteration, tf.errors.OutOfRangeError)


def _python_loop(
    call: Callable[[Any], Any],
    iterator: Any,
    num_steps: int,
    state: Any,
    reduce_fn: ReduceFn | None,
) -> tuple[Any, int]:
    """`call(iterator)` until `num_steps` or the data ends (StopIteration or OutOfRange)."""
    return run_python_loop(call, iterator, num_steps, state, reduce_fn, _END_OF_DATA)


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
        strategy = settings["strategy"] or engine_strategy() or tf.distribute.get_strategy()
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
        self._summaries = SummarySlots()  # what steps record with `looproto.summary`

    # -- building blocks (run at trace time) ---------------------------------

    def _function(self, fn: Callable[..., Any], jit_compile: bool | None = None) -> Any:
        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=self._reduce_retracing)

    def _step_on_batch(self, leaves: tuple[Any, ...]) -> Any:
        # Traced: the user's step, on one batch per iterator.
        self._on_trace(leaves)
        before = numeric_attributes(self._module)
        iterator = rebuild_nest(
            self._layout, [OneBatchIterator(self._step_name, batch) for batch in leaves]
        )
        # Every op of the step waits for its batch: TensorFlow orders stateful ops only
        # per resource, so without this a `step.assign_add(1)` could run although the
        # iterator had ended.
        with (
            tf.control_dependencies(tf.nest.flatten(leaves, expand_composites=True)),
            refusing_stale_reads(self._step_name, self._replicas),
        ):
            outputs = self._step_fn(iterator)
        self._check_side_effects(before)
        return outputs

    @tf.autograph.experimental.do_not_convert
    def _on_trace(self, leaves: Any) -> None:
        self.trace_count += 1
        signature = batch_signature(leaves)
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
        after = numeric_attributes(self._module)
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
        return tuple(next(it) for it in iter_leaves(iterator))

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
        leaves = iter_leaves(iterator)
        is_tf = all(is_tf_iterator(it) for it in leaves)
        if iterator is self._last_iterator:
            return is_tf
        layout = nest_layout(iterator)
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
            with _recording.recording(self._summaries):
                if not self._compile_step:
                    result = self._eager(iterator, num_steps, state, reduce_fn)
                else:
                    result = self._compiled(iterator, num_steps, state, reduce_fn)
            self._summaries.deliver()
            return result
        except PEER_FAILURES as err:
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

    def _lift(self) -> Lifted:
        """Binds the module's NumPy Variables to their `tf.Variable` twins (see `Lifted`).

        Not under a multi-replica strategy: a plain twin would not be mirrored, and which
        replica's update to keep is the model's choice (`tf.Variable(aggregation=...)`).
        """
        if self._replicas > 1:
            return NOTHING_LIFTED
        module = self._module
        if isinstance(module, Module):
            found = list(module._flatten(predicate=is_liftable))
        else:
            found = list(variables_by_path(module, predicate=is_liftable).values())
        return Lifted(found) if found else NOTHING_LIFTED

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
            return all(isinstance(it, ArrayIterator) for it in iter_leaves(iterator))
        return self._data == "stack"

    def _stacked_loop(self, iterator: Any, num_steps: int) -> int:
        """Pulls the loop's batches on the host, stacks them, runs them in one call.

        Consecutive batches of one shape form one segment (one call); a segment of a
        new shape traces once. Returns the steps that ran (fewer: the data ended).
        """
        leaves = iter_leaves(iterator)
        total = 0
        while num_steps < 0 or total < num_steps:
            want = _STACK_CHUNK if num_steps < 0 else num_steps - total
            batches = pull_batches(leaves, want)
            for segment in same_signature_runs(batches):
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
            leaves = tuple([next(leaf) for leaf in iter_leaves(it)])
            return self._run_batch(leaves)

        return _python_loop(call, iterator, num_steps, state, reduce_fn)

    def _function_without_data(self) -> Callable[[], Any]:
        fn = getattr(self, "_no_data_fn", None)
        if fn is None:

            def no_data() -> Any:
                self.trace_count += 1
                before = numeric_attributes(self._module)
                with refusing_stale_reads(self._step_name, self._replicas):
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
                leaves = tuple([next(leaf) for leaf in iter_leaves(it)])
                outputs = self.strategy.run(self._eager_step_on_batch, args=(leaves,))
            return tf.nest.map_structure(self._reduce_leaf, outputs)

        with self._scope():
            return _python_loop(call, iterator, num_steps, state, reduce_fn)

    def _eager_step_on_batch(self, leaves: tuple[Any, ...]) -> Any:
        iterator = rebuild_nest(
            self._layout, [OneBatchIterator(self._step_name, batch) for batch in leaves]
        )
        return self._step_fn(iterator)


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SCOPE: Final = _NullScope()
