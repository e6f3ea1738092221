"""Orbit's loop functions: `num_steps` calls of a step function, eager or in a graph.

`create_loop_fn` is the eager loop of looproto's TensorFlow backend (the loop every
backend's non-compiled path runs), which ends quietly at the end of the data, as
Orbit's does. `create_tf_while_loop_fn` and `create_tf_while_loop_fn_with_state` are the bodies
AutoGraph turns into a `tf.while_loop` inside a `tf.function`. `LoopFnWithSummaries`
runs the first step of a loop with summaries and the others without. (The
`StandardTrainer`/`StandardEvaluator` of `looproto.orbit` ask a looproto backend for
their loops instead; these are for hand-written runners.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from looproto import backends
from looproto.backends.base import LoopOptions
from looproto.errors import ConfigError
from looproto.orbit._values import as_int
from looproto.orbit.utils.tpu_summaries import OptionalSummariesFunction

__all__ = [
    "LoopFnWithSummaries",
    "create_loop_fn",
    "create_tf_while_loop_fn",
    "create_tf_while_loop_fn_with_state",
]

_MSG_NOT_A_TENSOR = (
    "`num_steps` should be a `tf.Tensor`: a Python number traces the surrounding "
    "`tf.function` again for every new value."
)


def create_loop_fn(step_fn: Callable[[Any], Any]) -> Callable[..., Any]:
    """A loop calling `step_fn(iterator)` from Python, folding its outputs into a state.

    The loop is `loop_fn(iterator, num_steps, state=None, reduce_fn=None)`: it runs
    `num_steps` steps (`-1`: until the data ends), sets
    `state = reduce_fn(state, step_fn(iterator))` after each when `reduce_fn` is given,
    and returns `state`. The end of the data (`StopIteration`, `tf.errors.OutOfRangeError`)
    ends it early without an error.
    """

    # The step calls `strategy.run` itself, as Orbit's steps do.
    loop = backends.get("tensorflow").make_loop(
        step_fn,
        module=None,
        options=LoopOptions(
            compile_step=False, compile_loop=False, backend_options={"wrap_strategy_run": False}
        ),
    )

    def loop_fn(
        iterator: Any,
        num_steps: Any,
        state: Any = None,
        reduce_fn: Callable[[Any, Any], Any] | None = None,
    ) -> Any:
        state, _ = loop(iterator, as_int(num_steps, "num_steps"), state, reduce_fn)
        return state

    return loop_fn


def create_tf_while_loop_fn(step_fn: Callable[[Any], Any]) -> Callable[[Any, Any], None]:
    """A loop body `loop_fn(iterator, num_steps)` that AutoGraph makes a `tf.while_loop`.

    Call it inside a `tf.function` with `num_steps` a scalar tensor; the step's outputs
    are dropped. It cannot run until the end of the data.

    Raises:
        ConfigError: (from `loop_fn`) `num_steps` is not a `tf.Tensor`.
    """

    def loop_fn(iterator: Any, num_steps: Any) -> None:
        if not isinstance(num_steps, tf.Tensor):
            raise ConfigError(_MSG_NOT_A_TENSOR)
        for _ in tf.range(num_steps):
            # An empty name scope: the step's ops are not all prefixed `while/`.
            with tf.name_scope(""):
                step_fn(iterator)

    return loop_fn


def create_tf_while_loop_fn_with_state(
    step_fn: Callable[[Any], Any],
) -> Callable[[Any, Any, Any, Callable[[Any, Any], Any]], Any]:
    """`loop_fn(iterator, num_steps, state, reduce_fn)`: `create_tf_while_loop_fn`, with a state.

    Each step's outputs are folded in: `state = reduce_fn(state, step_fn(iterator))`.
    The state keeps its structure over the loop; its tensors may change shape (every
    dimension is left unknown), so a reduce may concatenate the steps' outputs.

    Raises:
        ConfigError: (from `loop_fn`) `num_steps` is not a `tf.Tensor`.
    """

    def loop_fn(
        iterator: Any, num_steps: Any, state: Any, reduce_fn: Callable[[Any, Any], Any]
    ) -> Any:
        if not isinstance(num_steps, tf.Tensor):
            raise ConfigError(_MSG_NOT_A_TENSOR)

        def relaxed(value: Any) -> Any:
            if not tf.is_tensor(value):
                return None
            rank = value.shape.rank
            return tf.TensorShape([None] * rank) if rank else value.shape

        for _ in tf.range(num_steps):
            with tf.name_scope(""):
                tf.autograph.experimental.set_loop_options(
                    shape_invariants=[(state, tf.nest.map_structure(relaxed, state))]
                )
                state = reduce_fn(state, step_fn(iterator))
        return state

    return loop_fn


class LoopFnWithSummaries(OptionalSummariesFunction):
    """A `create_tf_while_loop_fn` loop whose first step records summaries, if due.

    When `tf.summary.should_record_summaries()` is true as a call starts, one step runs
    in the function compiled with summaries, and the remaining steps in the one compiled
    without them.
    """

    def __call__(self, iterator: Any, num_steps: Any) -> Any:
        output = None
        if tf.summary.should_record_summaries():
            output = self.with_summaries(iterator, tf.constant(1))
            num_steps -= 1
        if num_steps >= 1:
            output = self.without_summaries(iterator, num_steps)
        return output
