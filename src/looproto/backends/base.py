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

Optionally, a backend may also define `iterator_state(obj)`: for an iterator of its
framework (a `tf.data` iterator, say) an object with `get_state()` / `set_state(state)`
(JSON data) that reads and moves that iterator's position, else None. Checkpoints then
save the position with the variables, so a resumed run sees the batches an uninterrupted
run would have seen.

Two more optional methods make a backend run `looproto.portable` models, written
once against the Python array API: `array_namespace()`, the array API namespace
of its framework's arrays (`jax.numpy`, `array_api_compat.torch`, ...), and
`value_and_grad(fn, module, has_aux=False)`, `fn()` and its gradient with respect
to `module`'s trainable variables, keyed by their paths (`variables_by_path`).

Optionally, a backend may also define `initialize_distributed(timeout=...)`: it starts
(or adopts) its framework's multi-process engine and returns a
`looproto.distributed.Engine`; `looproto.distributed.initialize` calls it.

Only the backend's own module imports its framework. `looproto.testing.check_backend`
runs the whole contract against any backend, including third-party ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from looproto.errors import ProtocolError, value_repr

if TYPE_CHECKING:
    from looproto.module import Module

__all__ = ["Backend", "Loop", "LoopOptions", "ReduceFn", "StepFn", "split_aux"]

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
    """The adapter contract. See the module docstring."""

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

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> Loop:
        """Builds the inner loop that calls `step_fn(iterator)` repeatedly.

        Args:
            step_fn: The step (usually the bound `train_step`/`eval_step`).
            module: The module whose variables the step reads and writes. Backends
                that compile pure functions (JAX) lift these variables into the
                compiled call and write them back before the loop returns.
            options: See `LoopOptions`.
        """
        ...


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
