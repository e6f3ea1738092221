"""`StandardTrainer` and `StandardEvaluator`: Orbit's per-step hooks on a compiled loop.

Subclass `StandardTrainer` and write `train_step(iterator)`: one step, pulling its
batch with `next(iterator)`. The active backend turns the step into an inner loop
(`Backend.make_loop`): a Python loop on NumPy, `tf.function` + `tf.while_loop` on
TensorFlow, one `jax.jit(lax.scan)` call on JAX, `torch.compile` on PyTorch.
`train(num_steps)` then runs::

    train_loop_begin()
    <num_steps x train_step(iterator), compiled by the backend>
    return train_loop_end()

`StandardEvaluator` is the same shape for evaluation, with a reduce state::

    state = eval_begin()
    <for each step: state = eval_reduce(state, eval_step(iterator))>
    return eval_end(state)      # eval_end() when state is None

Metrics: a trainer's `train_metrics` and an evaluator's `eval_metrics` (mappings of
names to `looproto.metrics` metrics, or torchmetrics/Keras/Flax NNX ones; or lists of
metrics with names, as TensorFlow Models' trainers keep) are reset before each inner
loop or evaluation, and their results are added to its output (under their names; a
key the hook returns itself wins).

Which backend: `options.backend`, else the `LOOPROTO_BACKEND` environment
variable, else the framework of the module's variables, else NumPy.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import types
from collections.abc import Mapping
from typing import Any

from looproto import _nest, backends, metrics
from looproto.backends.base import Backend, Loop, LoopOptions, StepFn
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module import Module, Variable, backend_for_variable
from looproto.runner import AbstractEvaluator, AbstractTrainer, Output

__all__ = [
    "StandardEvaluator",
    "StandardEvaluatorOptions",
    "StandardTrainer",
    "StandardTrainerOptions",
]

_log = logging.getLogger("looproto")


def _check_bool(value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"`{argument}` must be a bool; received {argument}={value_repr(value)}.")


def _check_common(options: Any) -> None:
    """Validation shared by both options classes (Orbit's rules, looproto's names)."""
    _check_bool(options.use_compiled_step, "use_compiled_step")
    _check_bool(options.use_compiled_loop, "use_compiled_loop")
    if options.use_compiled_loop and not options.use_compiled_step:
        raise ConfigError(
            "`use_compiled_loop=True` and `use_compiled_step=False` is not supported: a "
            "compiled loop compiles its step. Pass `use_compiled_loop=False` as well to run "
            "eagerly."
        )
    if options.backend is not None and not isinstance(options.backend, str):
        raise ConfigError(
            f"`backend` must be a backend name or None; received backend={options.backend!r}."
        )
    if not isinstance(options.backend_options, Mapping):
        raise ConfigError(
            "`backend_options` must be a mapping of option names to values; received "
            f"backend_options={value_repr(options.backend_options)}."
        )


def _apply_orbit_aliases(options: Any, use_tf_function: Any, use_tf_while_loop: Any) -> None:
    # Orbit's option names, accepted so that ported code keeps working.
    if use_tf_function is not None:
        object.__setattr__(options, "use_compiled_step", use_tf_function)
    if use_tf_while_loop is not None:
        object.__setattr__(options, "use_compiled_loop", use_tf_while_loop)


@dataclasses.dataclass(frozen=True)
class StandardTrainerOptions:
    """How `StandardTrainer` builds its inner loop.

    Attributes:
        use_compiled_step: Compile `train_step` with the backend's compiler
            (`tf.function`, `jax.jit`, `torch.compile`). Orbit: `use_tf_function`.
        use_compiled_loop: Run the `num_steps` steps inside one compiled call where
            the backend can (`tf.while_loop`, `lax.scan`). Needs `use_compiled_step`.
            Orbit: `use_tf_while_loop`.
        backend: Backend name (`"numpy"`, `"jax"`, `"tensorflow"`, `"torch"`, or a
            registered third-party one). None: `LOOPROTO_BACKEND`, else the framework
            of the trainer's variables, else `"numpy"`.
        backend_options: Options for that backend only (see its docs).
        use_tf_function: Orbit's name for `use_compiled_step` (init only).
        use_tf_while_loop: Orbit's name for `use_compiled_loop` (init only).
    """

    use_compiled_step: bool = True
    use_compiled_loop: bool = True
    backend: str | None = None
    backend_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    use_tf_function: dataclasses.InitVar[bool | None] = None
    use_tf_while_loop: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, use_tf_function: Any, use_tf_while_loop: Any) -> None:
        _apply_orbit_aliases(self, use_tf_function, use_tf_while_loop)
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class StandardEvaluatorOptions:
    """How `StandardEvaluator` builds its inner loop.

    Attributes:
        use_compiled_step: Compile `eval_step` with the backend's compiler.
        use_compiled_loop: Run all steps of an evaluation in one compiled call where
            the backend can. Off by default (as in Orbit): evaluation often reduces
            into Python state.
        recreate_iterator_for_each_eval: Start every `evaluate()` from the beginning
            of the dataset (True), or continue where the last one stopped (False).
        backend: See `StandardTrainerOptions.backend`.
        backend_options: See `StandardTrainerOptions.backend_options`.
        use_tf_function: Orbit's name for `use_compiled_step` (init only).
        use_tf_while_loop: Orbit's name for `use_compiled_loop` (init only).
    """

    use_compiled_step: bool = True
    use_compiled_loop: bool = False
    recreate_iterator_for_each_eval: bool = True
    backend: str | None = None
    backend_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    use_tf_function: dataclasses.InitVar[bool | None] = None
    use_tf_while_loop: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, use_tf_function: Any, use_tf_while_loop: Any) -> None:
        _apply_orbit_aliases(self, use_tf_function, use_tf_while_loop)
        _check_common(self)
        _check_bool(self.recreate_iterator_for_each_eval, "recreate_iterator_for_each_eval")


def _refusing_text(step: StepFn) -> StepFn:
    """`step`, raising `ProtocolError` when it returns text (a str or bytes anywhere).

    What a train step returns is not used (Orbit's rule: outputs come from
    `train_loop_end`), but text there is a mistake no backend can carry. The check runs
    once per trace under a compiled backend, once per step on the eager ones.
    """

    def checked(owner: Any, iterator: Any) -> Any:
        outputs = step(iterator)
        for path, leaf in _nest.flatten_with_paths(outputs):
            if isinstance(leaf, (str, bytes)):
                where = f" at {_nest.path_to_str(path)!r}" if path else ""
                raise ProtocolError(
                    f"`{getattr(step, '__qualname__', 'train_step')}` returned text{where}: "
                    f"{value_repr(leaf)}; a train step returns None or arrays (return "
                    "outputs from `train_loop_end`)."
                )
        return outputs

    # A method of the same object, named as the step: backends name it in messages.
    for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
        if hasattr(step, attribute):
            setattr(checked, attribute, getattr(step, attribute))
    owner = getattr(step, "__self__", None)
    if owner is None:
        return functools.partial(checked, None)
    return types.MethodType(checked, owner)


def make_iterator(dataset: Any) -> Any:
    """`iter()` of a dataset, or a nested mapping/list of datasets (kept nested)."""
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):
        return {key: make_iterator(value) for key, value in dataset.items()}
    if isinstance(dataset, (list, tuple)) and not hasattr(dataset, "_fields"):
        # A list or tuple of datasets, as Orbit's `tf.nest.map_structure(iter, ...)`.
        return type(dataset)(make_iterator(value) for value in dataset)
    try:
        return iter(dataset)
    except TypeError as err:
        raise ConfigError(
            f"A dataset must be iterable (or a mapping of iterables); received "
            f"{value_repr(dataset)} of type {type(dataset).__name__}."
        ) from err


def check_num_steps(num_steps: Any, method: str) -> int:
    """Validates the `num_steps` argument of `train`/`evaluate`."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        try:
            import numpy as np

            if isinstance(num_steps, np.integer):
                return check_num_steps(int(num_steps), method)
        except ImportError:  # pragma: no cover - numpy is a core dependency
            pass
        raise ConfigError(
            f"`num_steps` of `{method}()` must be an int; received num_steps={num_steps!r}."
        )
    if num_steps == 0 or num_steps < -1:
        raise ConfigError(
            f"`num_steps` of `{method}()` must be > 0, or -1 to run until the data ends; "
            f"received num_steps={num_steps}."
        )
    return num_steps


def _metric_table(runner: Any, attribute: str) -> Any:
    """The runner's `train_metrics`/`eval_metrics` (checked by `looproto.metrics`), or None."""
    table = getattr(runner, attribute, None)
    return table if table else None


def _with_results(output: Output | None, table: Mapping[str, Any], attribute: str) -> Any:
    """`output` plus the metrics' results (a key of `output` wins)."""
    found = metrics.results(table, attribute)
    if output is None:
        return found
    if not isinstance(output, Mapping):
        return output  # `check_output` says what is wrong with it
    return {**found, **output}


def resolve_backend(name: str | None, module: Any) -> Backend:
    """The backend named `name`, else `LOOPROTO_BACKEND`, else inferred from `module`."""
    import os

    if name is None:
        name = os.environ.get(backends.ENV_VAR) or _infer_backend_name(module)
    return backends.get(name)


def _infer_backend_name(module: Any) -> str:
    for variable in getattr(module, "variables", ()):
        backend = backend_for_variable(variable)
        if backend.name != "numpy":
            return backend.name
        if not isinstance(variable, Variable):
            return backend.name
    return "numpy"


class StandardTrainer(AbstractTrainer, metaclass=abc.ABCMeta):
    """A trainer written as per-step hooks; the backend compiles the inner loop.

    Implement `train_step(iterator)`. Optionally implement `train_loop_begin()`
    (reset metrics) and `train_loop_end()` (return the outputs of the loop). Metrics
    in a `train_metrics` mapping are reset and reported without either (see the
    module docstring).

    The data iterator is created when the trainer is constructed and persists
    across `train()` calls, so training walks through the dataset rather than
    restarting it. If the iterator follows the iterator-state protocol
    (`get_state()`/`set_state()`, as `looproto.data.ArrayDataset`'s does), its
    position is saved in checkpoints with the variables.

    Example:
        >>> import numpy as np
        >>> import looproto
        >>> class Counter(StandardTrainer):
        ...     def __init__(self):
        ...         super().__init__(train_dataset=range(100))
        ...         self.global_step = looproto.create_global_step()
        ...         self.total = looproto.Variable(np.int64(0), trainable=False)
        ...     def train_step(self, iterator):
        ...         self.total.assign_add(next(iterator))
        ...         self.global_step.assign_add(1)
        ...     def train_loop_end(self):
        ...         return {"total": self.total.numpy()}
        >>> Counter().train(5)
        {'total': array(10)}
    """

    def __init__(
        self,
        train_dataset: Any,
        options: StandardTrainerOptions | None = None,
        name: str | None = None,
    ) -> None:
        """Initialises the trainer.

        Args:
            train_dataset: An iterable of batches (or a mapping of them); `next()` on
                its iterator gives one step's batch.
            options: See `StandardTrainerOptions`.
            name: Module name; defaults to the class name in snake_case.
        """
        # Module.__init__ directly: with `class R(StandardTrainer, StandardEvaluator)`
        # (Orbit's pattern) `super()` here would be StandardEvaluator.__init__.
        Module.__init__(self, name=name)
        options = options or StandardTrainerOptions()
        if not isinstance(options, StandardTrainerOptions):
            raise ConfigError(
                f"`options` must be a `StandardTrainerOptions`; received {value_repr(options)}."
            )
        self._train_options = options
        self._train_dataset = train_dataset
        self._train_iter = make_iterator(train_dataset)
        self._train_loop_fn: Loop | None = None

    def create_train_loop_fn(self) -> Loop:
        """Asks the backend for the inner loop around `train_step`."""
        options = self._train_options
        backend = resolve_backend(options.backend, self)
        return backend.make_loop(
            _refusing_text(self.train_step),
            module=self,
            options=LoopOptions(
                compile_step=options.use_compiled_step,
                compile_loop=options.use_compiled_loop,
                backend_options=options.backend_options,
            ),
        )

    def train(self, num_steps: int) -> Output | None:
        """Runs `train_loop_begin`, `num_steps` x `train_step`, `train_loop_end`.

        If the data ends first, the loop stops there; the global step then shows the
        steps that ran (the `Controller` stops training at that point).

        Returns:
            What `train_loop_end` returns.
        """
        num_steps = check_num_steps(num_steps, "train")
        table = _metric_table(self, "train_metrics")
        if table:
            metrics.reset(table, "train_metrics")
        self.train_loop_begin()
        self._run_train_loop(num_steps)
        output = self.train_loop_end()
        if table:
            output = _with_results(output, table, "train_metrics")
        _nest.check_output(output, "train_loop_end")
        return output

    def _run_train_loop(self, num_steps: int, loop: Loop | None = None) -> int:
        """Runs `num_steps` steps with `loop` (default the trainer's); returns the steps run."""
        if loop is None:
            if self._train_loop_fn is None:
                self._train_loop_fn = self.create_train_loop_fn()
            loop = self._train_loop_fn
        if self._train_iter is None and self._train_dataset is not None:
            self._train_iter = make_iterator(self._train_dataset)
        _, steps_run = loop(self._train_iter, num_steps)
        if num_steps != -1 and steps_run < num_steps:
            _log.info("train: the data ended after %d of %d steps.", steps_run, num_steps)
        return int(steps_run)

    def train_loop_begin(self) -> None:
        """Called before each inner loop (e.g. reset metrics). Does nothing by default."""

    @abc.abstractmethod
    def train_step(self, iterator: Any) -> Any:
        """Runs one step of training; take the step's batch with `next(iterator)`.

        Under a compiled backend this is traced or compiled, so keep it free of
        Python side effects other than assigning variables.
        """

    def train_loop_end(self) -> Output | None:
        """Called after each inner loop; its return is the output of `train()`."""
        return None

    @property
    def train_dataset(self) -> Any:
        """The training dataset. Setting it discards the current iterator."""
        return self._train_dataset

    @train_dataset.setter
    def train_dataset(self, train_dataset: Any) -> None:
        self._train_dataset = train_dataset
        self._train_iter = make_iterator(train_dataset)


class StandardEvaluator(AbstractEvaluator, metaclass=abc.ABCMeta):
    """An evaluator written as per-step hooks; the backend compiles the inner loop.

    Implement `eval_step(iterator)`. Optionally `eval_begin()` (reset metrics, or
    return an initial reduce state), `eval_reduce(state, step_outputs)` (fold one
    step's outputs into the state) and `eval_end(state)` (return the outputs).
    Metrics in an `eval_metrics` mapping are reset and reported without them.

    By default each `evaluate()` starts from the beginning of `eval_dataset`; with
    `recreate_iterator_for_each_eval=False` it continues where the last one stopped.
    `evaluate(-1)` runs until the data ends.
    """

    def __init__(
        self,
        eval_dataset: Any,
        options: StandardEvaluatorOptions | None = None,
        name: str | None = None,
    ) -> None:
        """Initialises the evaluator.

        Args:
            eval_dataset: An iterable of batches (or a mapping of them).
            options: See `StandardEvaluatorOptions`.
            name: Module name; defaults to the class name in snake_case.
        """
        # A class that is both a StandardTrainer and a StandardEvaluator has run
        # Module.__init__ already (keep the name it was given there).
        if not hasattr(self, "_name"):
            Module.__init__(self, name=name)
        options = options or StandardEvaluatorOptions()
        if not isinstance(options, StandardEvaluatorOptions):
            raise ConfigError(
                f"`options` must be a `StandardEvaluatorOptions`; received {value_repr(options)}."
            )
        self._eval_options = options
        self._eval_dataset = eval_dataset
        self._eval_iter: Any = None
        self._eval_loop_fn: Loop | None = None

    def create_eval_loop_fn(self) -> Loop:
        """Asks the backend for the inner loop around `eval_step`."""
        options = self._eval_options
        backend = resolve_backend(options.backend, self)
        return backend.make_loop(
            self.eval_step,
            module=self,
            options=LoopOptions(
                compile_step=options.use_compiled_step,
                compile_loop=options.use_compiled_loop,
                backend_options=options.backend_options,
            ),
        )

    def evaluate(self, num_steps: int) -> Output | None:
        """Runs `eval_begin`, `num_steps` x (`eval_step`, `eval_reduce`), `eval_end`.

        Args:
            num_steps: Steps to run, or -1 for "until the data ends".

        Returns:
            What `eval_end` returns.
        """
        num_steps = check_num_steps(num_steps, "evaluate")
        table = _metric_table(self, "eval_metrics")
        if table:
            metrics.reset(table, "eval_metrics")
        state = self._run_eval_loop(num_steps, self.eval_begin())
        output = self.eval_end() if state is None else self.eval_end(state)
        if table:
            output = _with_results(output, table, "eval_metrics")
        _nest.check_output(output, "eval_end")
        return output

    def _run_eval_loop(self, num_steps: int, state: Any) -> Any:
        """Runs `num_steps` steps from the reduce state `state`; returns the final state."""
        if self._eval_loop_fn is None:
            self._eval_loop_fn = self.create_eval_loop_fn()
        if self._eval_iter is None:
            iterator = make_iterator(self._eval_dataset)
            if not self._eval_options.recreate_iterator_for_each_eval:
                self._eval_iter = iterator
        else:
            iterator = self._eval_iter
        reduces = state is not None or type(self).eval_reduce is not StandardEvaluator.eval_reduce
        state, _ = self._eval_loop_fn(
            iterator, num_steps, state, self.eval_reduce if reduces else None
        )
        return state

    def eval_begin(self) -> Any:
        """Called before each evaluation; its return is the initial reduce state."""
        return None

    @abc.abstractmethod
    def eval_step(self, iterator: Any) -> Any:
        """Runs one step of evaluation; returns what `eval_reduce` folds in."""

    def eval_end(self, *args: Any) -> Output | None:
        """Called after each evaluation with the final state (if not None)."""
        return None

    def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
        """Folds one step's outputs into the state. Returns None by default."""
        return None

    @property
    def eval_dataset(self) -> Any:
        """The evaluation dataset. Setting it discards the current iterator."""
        return self._eval_dataset

    @eval_dataset.setter
    def eval_dataset(self, eval_dataset: Any) -> None:
        self._eval_dataset = eval_dataset
        self._eval_iter = None
