"""Private: what several backends share -- the eager loop, the per-step iterator, `split_aux`.

Framework-free. Every compiled loop pulls each step's batch itself (on the host, or in
the graph) and hands `train_step(iterator)` a `StepIterator` whose `next()` yields that
batch once: the step keeps Orbit's signature while the loop counts the steps that really
ran and keeps the data pipeline out of the compiled code. The eager loop
(`run_python_loop`) is the NumPy backend's, and every backend's non-compiled path.
`lazy_exports` lets a backend package be imported (and registered) without its framework.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from looproto import backends
from looproto.backends.base import Loop, ReduceFn, StepFn
from looproto.errors import ConfigError, ProtocolError, value_repr

__all__ = [
    "NO_DATA",
    "check_place",
    "env_int",
    "StepIterator",
    "is_iterator_container",
    "lazy_exports",
    "python_loop",
    "run_python_loop",
    "split_aux",
]

_log = logging.getLogger("looproto")


# ----------------------------------------------------------------------------
# The eager loop


def run_python_loop(
    call: Callable[[Any], Any],
    iterator: Any,
    num_steps: int,
    state: Any = None,
    reduce_fn: ReduceFn | None = None,
    end_of_data: tuple[type[BaseException], ...] = (StopIteration,),
) -> tuple[Any, int]:
    """`call(iterator)` until `num_steps` (`-1`: no limit) or one of `end_of_data` is raised.

    Returns `(state, steps_run)` as a `Loop` does. Backends whose data ends with their
    own exception (TensorFlow's `OutOfRangeError`) pass it in `end_of_data`.
    """
    step = 0
    try:
        while num_steps < 0 or step < num_steps:
            outputs = call(iterator)
            if reduce_fn is not None:
                state = reduce_fn(state, outputs)
            step += 1
    except end_of_data:
        _log.debug("The data iterator is exhausted after %d steps.", step)
    return state, step


def python_loop(step_fn: StepFn) -> Loop:
    """An eager loop calling `step_fn(iterator)` until `num_steps` or `StopIteration`.

    Other backends reuse it for their non-compiled paths.
    """

    def loop(
        iterator: Any, num_steps: int, state: Any = None, reduce_fn: ReduceFn | None = None
    ) -> tuple[Any, int]:
        return run_python_loop(step_fn, iterator, num_steps, state, reduce_fn)

    return loop


# ----------------------------------------------------------------------------
# One batch per step


NO_DATA: Any = object()
"""The batch of a loop that was given no data iterator (the dataset is None)."""


def is_iterator_container(obj: Any) -> bool:
    """True for a mapping, list or tuple of iterators (not for a namedtuple batch)."""
    return isinstance(obj, Mapping) or (
        isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields")
    )


class StepIterator:
    """`next()` yields this step's batch, once; a second `next()` is a `ProtocolError`.

    Args:
        step_name: The step's name, for messages.
        hint: What to do instead of calling `next` twice on this backend.
        batch: The batch (`NO_DATA` when the loop has no data); `feed` sets the next one.
    """

    # `_empty` is worked out here, outside any compiled region: a compiler tracing
    # `__next__` (torch.compile's Dynamo) reads a bool, not an identity test against
    # a sentinel `object()`, which some versions cannot trace.
    __slots__ = ("_batch", "_empty", "_hint", "_step_name", "_used")

    def __init__(self, step_name: str, hint: str, batch: Any = NO_DATA) -> None:
        self._step_name = step_name
        self._hint = hint
        self._batch = batch
        self._empty = batch is NO_DATA
        self._used = False

    def feed(self, batch: Any) -> None:
        """Makes `batch` the one the next `next()` yields."""
        self._batch = batch
        self._empty = batch is NO_DATA
        self._used = False

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> Any:
        if self._empty:
            raise ProtocolError(
                f"`{self._step_name}` called `next(iterator)`, but the loop was given no "
                "data iterator (the dataset is None)."
            )
        if self._used:
            raise ProtocolError(
                f"`{self._step_name}` called `next(iterator)` twice in one step. {self._hint}"
            )
        self._used = True
        return self._batch


# ----------------------------------------------------------------------------
# Gradients


def split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """`(loss, aux)` of what a `value_and_grad` function returned (`aux` None without aux).

    Raises:
        ProtocolError: `has_aux` is set and `out` is not a `(loss, aux)` pair.
    """
    if not has_aux:
        return out, None
    if not isinstance(out, tuple) or len(out) != 2:
        raise ProtocolError(
            f"With `has_aux=True`, `fn` must return `(loss, aux)`; received {value_repr(out)}."
        )
    return out


# ----------------------------------------------------------------------------
# Backend packages that import their framework on first use


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for a package whose public names live in its submodules.

    `exports` maps each public name to the submodule defining it; the submodule (and
    its framework) is imported when the name is first read. This is what lets a backend
    package register its backend, and its launcher read the environment, before the
    framework is imported.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 (a module's own `__getattr__`)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(exports)

    return __getattr__, __dir__


# ----------------------------------------------------------------------------
# Launchers: a process's place in a multi-process run, from its environment


def env_int(environ: Mapping[str, str], key: str) -> int:
    """The integer environment variable `key`.

    Raises:
        ConfigError: It is not an integer.
    """
    text = environ.get(key, "")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"The environment variable `{key}` must be an integer; received {text!r}."
        ) from None


def check_place(index: int, count: int, source: str) -> None:
    """Raises `ConfigError` unless `0 <= index < count` (`source` names the variables)."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"{source}: the process index must satisfy 0 <= index < count; received "
            f"index={index}, count={count}."
        )


# ----------------------------------------------------------------------------
# Metrics of the frameworks' own libraries


class ComputeMetricAdapter:
    """A metric with `reset()` and `compute()` (torchmetrics, Flax NNX) as
    `looproto.metrics` uses it."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def reset(self) -> None:
        """`metric.reset()`."""
        self.metric.reset()

    def result(self) -> Any:
        """`metric.compute()`: an array, or a dict of them for a collection."""
        return self.metric.compute()


# ----------------------------------------------------------------------------
# Checking Variable reads while a compiled step is traced


class TracingReadCheck:
    """Calls `check(variable, context)` on each Variable read in a thread that traces.

    The check sits in `looproto.backends.read_hooks` only while some thread is inside
    `tracing(context)`, so reads cost nothing otherwise; `context` (the step's name,
    say) is this thread's, so a thread that does not trace is never checked.
    """

    def __init__(self, check: Callable[[Any, Any], None]) -> None:
        self._check = check
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tracing = 0  # How many threads trace now (the hook is installed while > 0).

    def _hook(self, variable: Any) -> None:
        context = getattr(self._local, "context", None)
        if context is not None:
            self._check(variable, context)

    @contextlib.contextmanager
    def tracing(self, context: Any) -> Iterator[None]:
        """While this thread traces, with `context` (not None) for `check`."""
        previous = getattr(self._local, "context", None)
        self._local.context = context
        with self._lock:
            self._tracing += 1
            if self._tracing == 1:
                backends.read_hooks.append(self._hook)
        try:
            yield
        finally:
            self._local.context = previous
            with self._lock:
                self._tracing -= 1
                if self._tracing == 0:
                    backends.read_hooks.remove(self._hook)
