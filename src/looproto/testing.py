"""Conformance checks for your own trainers, evaluators and backends.

looproto's own test-suite runs these against every backend it ships, so they are
exercised on every change; run them in your tests against your code::

    from looproto import testing

    def test_my_trainer():
        trainer = MyTrainer(...)
        testing.check_trainer(trainer, global_step=trainer.global_step)

`read_events(logdir)` reads TensorBoard event files back as
`{run: {tag: [(step, value), ...]}}`, to check what TensorBoard would show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from looproto import _nest
from looproto._events import read_events
from looproto.backends.base import (
    Backend,
    LoopOptions,
    SupportsArrayAPI,
    SupportsAssignHook,
    SupportsDistributed,
    SupportsDtypes,
    SupportsGradients,
    SupportsHookGate,
    SupportsHyperparameters,
    SupportsIteratorState,
    SupportsMetrics,
    SupportsStateJSON,
)
from looproto.errors import ConfigError, LooprotoError, ShapeError
from looproto.module import Module, Variable
from looproto.runner import Evaluator, Trainer

__all__ = ["check_backend", "check_evaluator", "check_trainer", "read_events"]


def _fail(message: str) -> AssertionError:
    return AssertionError(f"looproto conformance: {message}")


def _read(step: Any) -> int:
    return int(np.asarray(step.numpy() if hasattr(step, "numpy") else step))


def _check_output_tree(output: Any, where: str) -> None:
    if output is None:
        return
    try:
        _nest.check_output(output, where)
        _nest.map_output(_nest.to_numpy_leaf, output)
    except LooprotoError as err:
        raise _fail(str(err)) from err


def check_trainer(trainer: Any, num_steps: int = 3, global_step: Any = None) -> Any:
    """Checks the `Trainer` contract on `trainer` by running `train(num_steps)` once.

    Args:
        trainer: The trainer under test.
        num_steps: Steps to run.
        global_step: If given, it must advance by exactly `num_steps`.

    Returns:
        The output of `train`, for further checks.

    Raises:
        AssertionError: The contract is broken; the message says how.
    """
    if not isinstance(trainer, Trainer):
        raise _fail(f"{type(trainer).__name__} has no `train(num_steps)` method.")
    before = _read(global_step) if global_step is not None else None
    output = trainer.train(num_steps)
    _check_output_tree(output, f"{type(trainer).__name__}.train")
    if before is not None:
        advanced = _read(global_step) - before
        if advanced != num_steps:
            raise _fail(
                f"`train({num_steps})` advanced the global step by {advanced}, "
                f"expected {num_steps}."
            )
    return output


def check_evaluator(evaluator: Any, num_steps: int = 3) -> Any:
    """Checks the `Evaluator` contract: `evaluate(num_steps)` returns None or numeric outputs.

    Returns:
        The output of `evaluate`.
    """
    if not isinstance(evaluator, Evaluator):
        raise _fail(f"{type(evaluator).__name__} has no `evaluate(num_steps)` method.")
    output = evaluator.evaluate(num_steps)
    _check_output_tree(output, f"{type(evaluator).__name__}.evaluate")
    return output


class _Counter(Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []


_CAPABILITIES: dict[str, type] = {
    protocol.__name__: protocol
    for protocol in (
        SupportsArrayAPI,
        SupportsAssignHook,
        SupportsDistributed,
        SupportsDtypes,
        SupportsGradients,
        SupportsHookGate,
        SupportsHyperparameters,
        SupportsIteratorState,
        SupportsMetrics,
        SupportsStateJSON,
    )
}


def check_backend(
    backend: Backend,
    make_variable: Callable[[np.ndarray[Any, Any]], Any] | None = None,
) -> list[str]:
    """Checks the framework-independent parts of the backend contract.

    Covers: identity and version; discovery answers for foreign objects; the eager
    loop (`compile_step=False`): step counting, `num_steps=-1`, end of data,
    reduce state; unknown `backend_options` rejected; `to_host` of NumPy trees;
    `name_scope` usable as a context manager; the optional protocols the backend
    follows, on objects of no framework. With `make_variable` (a function building one
    of the backend's variables from a NumPy array) also: discovery, `to_numpy`,
    `assign` round trips, and `ShapeError` on a wrong shape.

    Returns:
        The names of the optional protocols the backend follows
        (`looproto.backends.SupportsGradients`, ...), sorted.

    Raises:
        AssertionError: The contract is broken; the message says how.
    """
    if not isinstance(backend, Backend):
        raise _fail(f"{backend!r} does not follow `looproto.backends.Backend`.")
    if not isinstance(backend.name, str) or not backend.name:
        raise _fail(f"`name` must be a non-empty string; got {backend.name!r}.")
    if not isinstance(backend.version(), str):
        raise _fail("`version()` must return a string.")
    for foreign in (object(), 1.5, "text", np.zeros(3)):
        if backend.is_variable(foreign):
            raise _fail(f"`is_variable({foreign!r})` is True for a non-variable.")
        if backend.expand(foreign) is not None:
            raise _fail(f"`expand({foreign!r})` must be None for a non-container.")

    with backend.name_scope("conformance/"):
        pass

    host = backend.to_host({"a": np.float32(1.5), "b": {"c": np.arange(3)}})
    if float(host["a"]) != 1.5 or np.asarray(host["b"]["c"]).tolist() != [0, 1, 2]:
        raise _fail(f"`to_host` changed NumPy values: {host!r}.")

    module = _Counter()

    def step(iterator: Any) -> Any:
        value = next(iterator)
        module.seen.append(value)
        return value

    eager = LoopOptions(compile_step=False, compile_loop=False)
    loop = backend.make_loop(step, module=module, options=eager)
    state, steps = loop(iter(range(10)), 4)
    if steps != 4 or module.seen != [0, 1, 2, 3] or state is not None:
        raise _fail(f"an eager loop of 4 steps ran {steps} steps over {module.seen}.")
    module.seen.clear()
    state, steps = loop(iter(range(3)), 5)
    if steps != 3:
        raise _fail(f"a loop over 3 batches asked for 5 steps reported {steps} steps run.")
    module.seen.clear()
    state, steps = loop(iter(range(6)), -1, 0, lambda total, value: total + value)
    if steps != 6 or state != 15:
        raise _fail(f"`num_steps=-1` with a sum reduce gave state={state!r}, steps={steps}.")

    try:
        backend.make_loop(
            step,
            module=module,
            options=LoopOptions(backend_options={"no_such_option_for_conformance": 1}),
        )
    except ConfigError:
        pass
    else:
        raise _fail("an unknown key in `backend_options` must raise `ConfigError`.")

    if make_variable is not None:
        _check_variables(backend, make_variable)
    return _check_capabilities(backend)


def _check_capabilities(backend: Backend) -> list[str]:
    foreign = object()
    if isinstance(backend, SupportsArrayAPI) and not hasattr(backend.array_namespace(), "asarray"):
        raise _fail("`array_namespace()` must return an array API namespace (with `asarray`).")
    if isinstance(backend, SupportsIteratorState) and backend.iterator_state(foreign) is not None:
        raise _fail("`iterator_state` must be None for an object of no framework.")
    if isinstance(backend, SupportsStateJSON) and backend.state_to_json(foreign) is not None:
        raise _fail("`state_to_json` must be None for an object of no framework.")
    if isinstance(backend, SupportsMetrics) and backend.metric_adapter(foreign) is not None:
        raise _fail("`metric_adapter` must be None for an object of no framework.")
    if (
        isinstance(backend, SupportsHyperparameters)
        and backend.hyperparameters(foreign) is not None
    ):
        raise _fail("`hyperparameters` must be None for an object of no framework.")
    if isinstance(backend, SupportsHookGate) and not isinstance(backend.hooks_gated(), bool):
        raise _fail("`hooks_gated()` must return a bool.")
    if (
        isinstance(backend, SupportsDtypes)
        and backend.numpy_dtype(np.dtype("float32")) != np.float32
    ):
        raise _fail("`numpy_dtype` must return NumPy dtypes unchanged.")
    return sorted(name for name, protocol in _CAPABILITIES.items() if isinstance(backend, protocol))


def _check_variables(
    backend: Backend, make_variable: Callable[[np.ndarray[Any, Any]], Any]
) -> None:
    initial = np.arange(6, dtype=np.float32).reshape(2, 3)
    variable = make_variable(initial)
    if not isinstance(variable, Variable) and not backend.is_variable(variable):
        raise _fail("`is_variable` is False for a variable made by `make_variable`.")
    np.testing.assert_array_equal(backend.to_numpy(variable), initial)

    holder = Module(name="holder")
    holder.v = variable  # type: ignore[attr-defined]
    if not any(found is variable for found in holder.variables):
        raise _fail("a variable held as a module attribute is not in `Module.variables`.")

    updated = initial * 2 + 1
    backend.assign(variable, updated)
    np.testing.assert_array_equal(backend.to_numpy(variable), updated)
    copy = backend.to_numpy(variable)
    copy[...] = -1
    np.testing.assert_array_equal(backend.to_numpy(variable), updated)

    try:
        backend.assign(variable, np.zeros((3, 2), np.float32))
    except ShapeError:
        pass
    else:
        raise _fail("`assign` of a wrongly shaped array must raise `ShapeError`.")


def as_mapping(output: Any) -> Mapping[str, Any]:
    """`output` converted to nested NumPy values (for assertions in tests)."""
    return dict(_nest.map_output(_nest.to_numpy_leaf, output or {}))
