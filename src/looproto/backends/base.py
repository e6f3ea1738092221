"""The backend contract: what an adapter for one framework supplies.

A backend is a small object. The core asks it four kinds of question:

* **Discovery** -- `is_variable`, `is_trainable`, `expand`: so `Module.variables`
  finds this framework's variables (and the parameters inside its own containers,
  such as a `torch.nn.Module`) wherever they sit in a module tree.
* **Values** -- `to_numpy`, `assign`, `to_host`: so checkpoints read and restore
  any variable as a plain NumPy array, and loop outputs reach the host in one
  transfer.
* **Scopes** -- `name_scope`: the framework's own scope (`tf.name_scope`,
  `jax.named_scope`, `torch.profiler.record_function`), entered whenever a
  `looproto.NameScope` is.
* **Loops** -- `make_loop`: the compiled inner loop. It runs `num_steps` calls of
  a step function in as few host round-trips as the framework allows.

What a backend may supply beyond that is a set of small protocols, each checked with
`isinstance` where the core needs it and reported by `looproto.testing.check_backend`:

* `SupportsGradients` -- `value_and_grad` and `grad` over a module's trainable
  variables (what a `looproto.portable` model trains with);
* `SupportsArrayAPI` -- `array_namespace()`, the Python array API on its arrays;
* `SupportsIteratorState` -- `iterator_state(obj)`: the position of one of its
  framework's data iterators, saved in checkpoints;
* `SupportsStateJSON` -- its framework's values inside such a position, as JSON;
* `SupportsDistributed` -- `initialize_distributed(timeout=...)`, its multi-process
  `Engine`;
* `SupportsAssignHook` -- `on_assign`, called before every `Variable.assign`;
* `SupportsHookGate` -- `hooks_gated()`: while it says so, no framework hook runs;
* `SupportsDtypes` -- `numpy_dtype(dtype)` for its framework's dtypes;
* `SupportsMetrics` -- `metric_adapter(obj)`: its framework's metric objects
  (torchmetrics, Keras, Flax NNX metrics) reset and read by `looproto.metrics`;
* `SupportsHyperparameters` -- `hyperparameters(obj)`: what one of its framework's
  optimizers applies next (learning rate, momentum, ...), for
  `looproto.actions.LearningRateMonitor`;
* `SupportsGlobalValues` -- on an `Engine`: its processes' steps compute global values.

What `expand` yields may include, besides variables, objects following the
iterator-state protocol (`IteratorState`: the JSON part of an object's state, such as a
scheduler's flags) and `Unsaveable` leaves, for state a checkpoint cannot hold: the
tree still walks, and a save (or a restore into it) raises, naming the leaf's path.

Facts needed before a framework is imported -- which packages' objects a backend
understands, how to install it, how its processes find each other (a `Launcher`) --
are given to `looproto.backends.register`. Only the backend's own folder imports its
framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Backend",
    "Engine",
    "IteratorState",
    "Launcher",
    "Loop",
    "LoopOptions",
    "ReduceFn",
    "StepFn",
    "SupportsArrayAPI",
    "MetricAdapter",
    "SupportsDistributed",
    "SupportsDtypes",
    "SupportsGlobalValues",
    "SupportsGradients",
    "SupportsHyperparameters",
    "SupportsIteratorState",
    "SupportsMetrics",
    "SupportsStateJSON",
    "Unsaveable",
    "WorkerEnvironment",
]

StepFn = Callable[[Any], Any]
"""One step: takes the data iterator, returns the step's outputs (or None)."""

ReduceFn = Callable[[Any, Any], Any]
"""Folds one step's outputs into the loop state: `state = reduce_fn(state, outputs)`."""


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How a backend should build an inner loop.

    Attributes:
        compile_step: Compile the step with the framework's compiler (`tf.function`,
            `jax.jit`, `torch.compile`). False runs it eagerly, for debugging.
        compile_loop: Run all `num_steps` steps inside one compiled call where the
            framework can (`tf.while_loop`, `lax.scan`). Requires `compile_step`.
        backend_options: Options only this backend understands (e.g. `jit_compile`
            for TensorFlow, `mode` for `torch.compile`). A backend rejects keys it
            does not know with `ConfigError`.
    """

    compile_step: bool = True
    compile_loop: bool = True
    backend_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Loop(Protocol):
    """An inner loop built by `Backend.make_loop`."""

    def __call__(
        self,
        iterator: Any,
        num_steps: int,
        state: Any = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Any, int]:
        """Runs up to `num_steps` steps (`-1`: until the iterator is exhausted).

        Returns:
            `(state, steps_run)`: the final reduce state (the `state` argument when
            `reduce_fn` is None) and how many steps actually ran. Fewer than
            `num_steps` means the data ran out; that is not an error.
        """
        ...


@runtime_checkable
class Backend(Protocol):
    """The adapter contract (see the module docstring for the optional protocols)."""

    name: str

    def version(self) -> str:
        """The framework's version string (NumPy's for the NumPy backend)."""
        ...

    def is_variable(self, obj: Any) -> bool:
        """True if `obj` is a variable of this framework."""
        ...

    def is_trainable(self, obj: Any) -> bool:
        """True if the variable `obj` is trainable (`trainable`, `requires_grad`)."""
        ...

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """`(path, leaf)` pairs for a framework container (e.g. `torch.nn.Module`), else None."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """A host NumPy copy of a variable or array of this framework."""
        ...

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """Writes `array` into `variable` in place (device, sharding and dtype kept).

        `variable` is this framework's variable or a `looproto.Variable` holding
        this framework's array.
        """
        ...

    def to_host(self, tree: Any) -> Any:
        """Converts a nested output of arrays to NumPy, in as few transfers as possible."""
        ...

    def name_scope(self, scope: str) -> AbstractContextManager[Any]:
        """The framework's own scope for the full looproto scope `scope` (ends in `/`)."""
        ...

    def make_loop(self, step_fn: StepFn, *, module: Any, options: LoopOptions) -> Loop:
        """Builds the inner loop that calls `step_fn(iterator)` repeatedly.

        Args:
            step_fn: The step (usually the bound `train_step`/`eval_step`).
            module: The `looproto.Module` whose variables the step reads and writes. Backends
                that compile pure functions (JAX) lift these variables into the
                compiled call and write them back before the loop returns.
            options: See `LoopOptions`.
        """
        ...


# ----------------------------------------------------------------------------
# Optional capabilities


@runtime_checkable
class SupportsGradients(Protocol):
    """A backend that differentiates with respect to a module's trainable variables."""

    def value_and_grad(
        self, fn: Callable[[], Any], module: Any, has_aux: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """`(fn(), grads)`, the gradients keyed by variable path (`variables_by_path`).

        With `has_aux`, `fn` returns `(loss, aux)` and the result is `((loss, aux), grads)`.
        """
        ...

    def grad(self, fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
        """The gradients of `value_and_grad` alone (`(grads, aux)` with `has_aux`)."""
        ...


@runtime_checkable
class SupportsArrayAPI(Protocol):
    """A backend whose arrays have a Python array API namespace (`looproto.portable`)."""

    def array_namespace(self) -> Any:
        """The namespace (`jax.numpy`, `array_api_compat.torch`, ...)."""
        ...


@runtime_checkable
class IteratorState(Protocol):
    """Reads and moves a data iterator's position (JSON data): the iterator-state protocol."""

    def get_state(self) -> Any:
        """The position, as JSON data."""
        ...

    def set_state(self, state: Any) -> None:
        """Moves the iterator to a position `get_state` returned."""
        ...


class Unsaveable:
    """A leaf standing, in a module tree, for framework state a checkpoint cannot hold.

    A backend's `expand` yields one where an object's state holds something looproto
    cannot store (a list of tensors whose length changes, a callable object, a
    `state_dict()` that raises). Walking the tree still works; saving it, or restoring
    into it, raises a `CheckpointError` that names the leaf's path and gives `reason`,
    so an object is never left out of a checkpoint silently.

    Args:
        reason: What the object holds, why a checkpoint cannot store it, what to do.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unsaveable({self.reason!r})"


@runtime_checkable
class SupportsIteratorState(Protocol):
    """A backend that saves the position of its framework's data iterators in checkpoints."""

    def iterator_state(self, obj: Any) -> IteratorState | None:
        """An `IteratorState` for `obj` (a `tf.data` iterator, say), else None."""
        ...


@runtime_checkable
class SupportsStateJSON(Protocol):
    """A backend whose framework's values may sit inside an iterator's state.

    Checkpoints keep iterator states as JSON; a torch tensor inside a data loader's
    sampler state, say, is written by `state_to_json` and read back by `state_from_json`
    under one of the JSON tags the backend was registered with (`register(json_tags=...)`).
    """

    def state_to_json(self, value: Any) -> tuple[str, Any] | None:
        """`(tag, JSON payload)` for one of this framework's values, else None."""
        ...

    def state_from_json(self, tag: str, payload: Any) -> Any:
        """The value `state_to_json` wrote as `(tag, payload)`."""
        ...


@runtime_checkable
class SupportsAssignHook(Protocol):
    """A backend that takes part in every `looproto.Variable.assign`."""

    def on_assign(self, variable: Any, value: Any) -> bool | None:
        """Called before `variable.assign(value)`; True: the backend stored the value itself.

        It may also refuse the value (a JAX tracer outside a trace, say) by raising.
        """
        ...


@runtime_checkable
class SupportsHookGate(Protocol):
    """A backend that pauses every framework hook (scopes, `on_assign`) at times."""

    def hooks_gated(self) -> bool:
        """True while no framework hook may run (inside its compiler, say)."""
        ...


@runtime_checkable
class SupportsDtypes(Protocol):
    """A backend whose dtypes are not NumPy's (`torch.float32`, `tf.float32`)."""

    def numpy_dtype(self, dtype: Any) -> np.dtype[Any]:
        """NumPy's dtype for one of this framework's dtypes."""
        ...


@runtime_checkable
class MetricAdapter(Protocol):
    """A framework's metric object as `looproto.metrics` sees it."""

    def reset(self) -> None:
        """Clears the metric's state (before an inner loop or an evaluation)."""
        ...

    def result(self) -> Any:
        """The result so far (an array, or a mapping of them for a collection),
        already merged over processes the framework's own way."""
        ...


@runtime_checkable
class SupportsMetrics(Protocol):
    """A backend that knows its framework's metric objects (torchmetrics, Keras, ...)."""

    def metric_adapter(self, obj: Any) -> MetricAdapter | None:
        """A `MetricAdapter` for `obj` if it is one of its framework's metrics, else None."""
        ...


@runtime_checkable
class SupportsHyperparameters(Protocol):
    """A backend that reads its framework's optimizers' hyper-parameters."""

    def hyperparameters(self, obj: Any) -> dict[str, float] | None:
        """What optimizer `obj` applies at its next update, by name, else None.

        Names are the same on every backend: `learning_rate`, `weight_decay`,
        `momentum`, `beta_1`, `beta_2`; an optimizer with several parameter groups
        adds `/group_<i>` to the names of all but the first group's (e.g.
        `learning_rate/group_1`). A learning-rate scheduler stands for its optimizer.
        """
        ...


# ----------------------------------------------------------------------------
# Multi-process


@dataclasses.dataclass(frozen=True)
class WorkerEnvironment:
    """Where a process sits in a multi-process run, as its environment says.

    Attributes:
        process_index: This process's index.
        process_count: How many processes the run has.
        coordinator: `host:port` of the coordinator (torch's `MASTER_ADDR:MASTER_PORT`,
            JAX's coordinator, TensorFlow's first task), or None where it is not set.
    """

    process_index: int
    process_count: int
    coordinator: str | None


@runtime_checkable
class Launcher(Protocol):
    """How a backend's processes find each other, read from and written to the environment.

    Framework-free: `looproto train --num-processes` launches workers, and a worker
    learns its place, before any framework is imported.
    """

    def environment(self, environ: Mapping[str, str]) -> WorkerEnvironment | None:
        """This process's place in a run as `environ` gives it, or None (not launched so).

        Raises:
            ConfigError: The variables are there but malformed.
        """
        ...

    def ports_needed(self, num_processes: int) -> int:
        """How many free ports a local launch of `num_processes` workers needs."""
        ...

    def worker_environment(
        self, process_index: int, num_processes: int, ports: Sequence[int], host: str
    ) -> dict[str, str]:
        """The environment variables of local worker `process_index`."""
        ...


@runtime_checkable
class Engine(Protocol):
    """What a backend's distributed engine supplies (see `looproto.distributed.initialize`).

    Attributes:
        backend: The backend's name.
        process_index: This process's index, `0 <= process_index < process_count`.
        process_count: How many processes take part.
        timeout: Seconds to wait for another process before giving up.
        collective_checkpoints: Whether orbax sees the processes (then every process
            calls orbax's save and orbax decides who writes what). False: the chief
            writes and the others wait for it.
    """

    backend: str
    process_index: int
    process_count: int
    timeout: float
    collective_checkpoints: bool

    def key_value_set(self, key: str, value: str) -> None:
        """Publishes `value` under `key` in the engine's key-value store."""
        ...

    def key_value_get(self, key: str, timeout: float) -> str:
        """Waits up to `timeout` seconds for `key`; raises if it does not appear."""
        ...

    def key_value_delete(self, key: str) -> None:
        """Removes `key` (it was read by every process)."""
        ...

    def scope(self) -> AbstractContextManager[Any]:
        """Entered while the trainer is built (`strategy.scope()` on TensorFlow)."""
        ...

    def shutdown(self) -> None:
        """Leaves the process group (a clean exit; every process calls it)."""
        ...


@runtime_checkable
class SupportsGlobalValues(Protocol):
    """An `Engine` whose compiled steps compute global values on every process.

    JAX's global mesh: a loss over a batch sharded across processes is the whole
    batch's, the same on each. Without it (torch's DistributedDataParallel), each
    process's values are its own slice's, and metrics are merged over processes.
    """

    def values_are_global(self) -> bool:
        """True: a step's values are the same, global ones on every process."""
        ...


@runtime_checkable
class SupportsDistributed(Protocol):
    """A backend with a multi-process engine (`looproto.distributed.initialize`)."""

    def initialize_distributed(self, timeout: float = ...) -> Engine:
        """Starts (or adopts) the framework's multi-process engine."""
        ...
