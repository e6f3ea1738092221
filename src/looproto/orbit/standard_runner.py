"""Orbit's `StandardTrainer` and `StandardEvaluator`, on looproto's compiled loops.

They are `looproto.StandardTrainer`/`StandardEvaluator` (the backend compiles the loop
of `train_step`/`eval_step`; the data iterator lives with the runner) with Orbit's
surface: Orbit's options (`use_tf_function`, `use_tf_while_loop`,
`use_tpu_summary_optimization`, `recreate_iterator_for_each_eval`), `num_steps` as a
tensor, and whatever `train_loop_end`/`eval_end` return passed through unchecked.

The loop's backend is `options.backend`, else `LOOPROTO_BACKEND`, else the framework
of the runner's variables; a runner that holds no variable at all (its steps use
TensorFlow only) gets TensorFlow, Orbit's framework. On TensorFlow the step is called
in cross-replica context (`wrap_strategy_run=False`): Orbit's steps call
`strategy.run` themselves.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from looproto import backends
from looproto import standard_runner as _core
from looproto.backends.base import Loop, LoopOptions, StepFn
from looproto.errors import ConfigError, value_repr
from looproto.orbit import runner
from looproto.orbit._values import as_int

__all__ = [
    "StandardEvaluator",
    "StandardEvaluatorOptions",
    "StandardTrainer",
    "StandardTrainerOptions",
]


@dataclasses.dataclass(frozen=True)
class StandardTrainerOptions:
    """How `StandardTrainer` builds its loop (Orbit's fields, then looproto's).

    Attributes:
        use_tf_function: Compile `train_step` (`tf.function` on TensorFlow; the
            backend's compiler elsewhere).
        use_tf_while_loop: Run all steps of a `train()` in one compiled loop where
            the backend can (`tf.while_loop`). Needs `use_tf_function`.
        use_tpu_summary_optimization: Compile the loop twice, with and without
            summaries; when summaries are due, one step runs in the first and the rest
            in the second. Needs `use_tf_while_loop`.
        backend: A looproto backend name; None: see the module docstring.
        backend_options: Options of that backend (see its page under `docs/backends/`).
    """

    use_tf_function: bool = True
    use_tf_while_loop: bool = True
    use_tpu_summary_optimization: bool = False
    backend: str | None = None
    backend_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StandardEvaluatorOptions:
    """How `StandardEvaluator` builds its loop (Orbit's fields, then looproto's).

    Attributes:
        use_tf_function: Compile `eval_step`.
        use_tf_while_loop: Run all steps of an `evaluate()` in one compiled loop where
            the backend can. Needs `use_tf_function`.
        recreate_iterator_for_each_eval: Start every `evaluate()` at the beginning of
            `eval_dataset` (True), or where the last one stopped (False).
        backend: A looproto backend name; None: see the module docstring.
        backend_options: Options of that backend.
    """

    use_tf_function: bool = True
    use_tf_while_loop: bool = False
    recreate_iterator_for_each_eval: bool = True
    backend: str | None = None
    backend_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _check_options(options: Any, expected: type, argument: str) -> None:
    if not isinstance(options, expected):
        raise ConfigError(
            f"`{argument}` must be a `looproto.orbit.{expected.__name__}`; received "
            f"{value_repr(options)} of type {type(options).__name__}."
        )
    checked: Any = options
    if checked.use_tf_while_loop and not checked.use_tf_function:
        raise ConfigError("`use_tf_while_loop=True` and `use_tf_function=False` is not supported")


def _backend_for(runner_: Any, name: str | None) -> Any:
    if name is None and not os.environ.get(backends.ENV_VAR) and not runner_.variables:
        name = "tensorflow"
    return _core.resolve_backend(name, runner_)


def _make_loop(runner_: Any, step_fn: StepFn, options: Any) -> Loop:
    backend = _backend_for(runner_, options.backend)
    backend_options = dict(options.backend_options)
    if backend.name == "tensorflow":
        backend_options.setdefault("wrap_strategy_run", False)
    loop: Loop = backend.make_loop(
        step_fn,
        module=runner_,
        options=LoopOptions(
            compile_step=options.use_tf_function,
            compile_loop=options.use_tf_while_loop,
            backend_options=backend_options,
        ),
    )
    return loop


class StandardTrainer(runner.AbstractTrainer, _core.StandardTrainer, metaclass=abc.ABCMeta):
    """Implement `train_step(iterator)`; `train(num_steps)` runs Orbit's loop::

        train_loop_begin()
        <num_steps x train_step(iterator), compiled>
        return train_loop_end()         # any value, passed through

    Args:
        train_dataset: A `tf.data.Dataset`, a distributed dataset, any iterable of
            batches, or a nested dict/list of them.
        options: A `StandardTrainerOptions`.
    """

    def __init__(self, train_dataset: Any, options: StandardTrainerOptions | None = None) -> None:
        options = options or StandardTrainerOptions()
        _check_options(options, StandardTrainerOptions, "options")
        if options.use_tpu_summary_optimization and not options.use_tf_while_loop:
            raise ConfigError(
                "`use_tpu_summary_optimization=True` and `use_tf_while_loop=False` is not supported"
            )
        _core.StandardTrainer.__init__(
            self,
            train_dataset,
            options=_core.StandardTrainerOptions(
                use_compiled_step=options.use_tf_function,
                use_compiled_loop=options.use_tf_while_loop,
                backend=options.backend,
                backend_options=options.backend_options,
            ),
        )
        self._orbit_train_options = options
        self._loop_without_summaries: Loop | None = None

    def create_train_loop_fn(self) -> Loop:
        """The backend's loop around `train_step` (see the module docstring)."""
        return _make_loop(self, self.train_step, self._orbit_train_options)

    def train(self, num_steps: Any) -> Any:
        """Runs `train_loop_begin`, `num_steps` x `train_step`, `train_loop_end`.

        Args:
            num_steps: An int or an integer scalar tensor (`-1`: until the data ends).

        Returns:
            What `train_loop_end` returns.
        """
        steps = _core.check_num_steps(as_int(num_steps, "num_steps"), "train")
        self.train_loop_begin()
        if self._orbit_train_options.use_tpu_summary_optimization:
            self._train_with_optional_summaries(steps)
        else:
            self._run_train_loop(steps)
        return self.train_loop_end()

    def _train_with_optional_summaries(self, steps: int) -> None:
        # The loop compiled with summaries runs one step when they are due; the rest
        # run in a second loop, traced (and so compiled) under `record_if(False)`.
        if steps != 0 and bool(tf.summary.should_record_summaries()):
            ran = self._run_train_loop(1)
            if ran < 1:
                return
            steps = steps - 1 if steps > 0 else steps
        if steps == 0:
            return
        if self._loop_without_summaries is None:
            self._loop_without_summaries = self.create_train_loop_fn()
        with tf.summary.record_if(False):
            self._run_train_loop(steps, self._loop_without_summaries)


class StandardEvaluator(runner.AbstractEvaluator, _core.StandardEvaluator, metaclass=abc.ABCMeta):
    """Implement `eval_step(iterator)`; `evaluate(num_steps)` runs Orbit's loop::

        state = eval_begin()
        <for each step: state = eval_reduce(state, eval_step(iterator))>
        return eval_end(state)          # eval_end() when state is None; any value

    Args:
        eval_dataset: A `tf.data.Dataset`, a distributed dataset, any iterable of
            batches, or a nested dict/list of them.
        options: A `StandardEvaluatorOptions`.
    """

    def __init__(self, eval_dataset: Any, options: StandardEvaluatorOptions | None = None) -> None:
        options = options or StandardEvaluatorOptions()
        _check_options(options, StandardEvaluatorOptions, "options")
        _core.StandardEvaluator.__init__(
            self,
            eval_dataset,
            options=_core.StandardEvaluatorOptions(
                use_compiled_step=options.use_tf_function,
                use_compiled_loop=options.use_tf_while_loop,
                recreate_iterator_for_each_eval=options.recreate_iterator_for_each_eval,
                backend=options.backend,
                backend_options=options.backend_options,
            ),
        )
        self._orbit_eval_options = options

    def create_eval_loop_fn(self) -> Loop:
        """The backend's loop around `eval_step` (see the module docstring)."""
        return _make_loop(self, self.eval_step, self._orbit_eval_options)

    def evaluate(self, num_steps: Any) -> Any:
        """Runs `eval_begin`, `num_steps` x (`eval_step`, `eval_reduce`), `eval_end`.

        Args:
            num_steps: An int or an integer scalar tensor; `-1` runs until the data ends.

        Returns:
            What `eval_end` returns.
        """
        steps = _core.check_num_steps(as_int(num_steps, "num_steps"), "evaluate")
        state = self._run_eval_loop(steps, self.eval_begin())
        return self.eval_end() if state is None else self.eval_end(state)
