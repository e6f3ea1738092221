"""`JaxBackend`, the `looproto.backends.Backend` for JAX.

The backend object is the entry point the core talks to: it recognises variables
(looproto's and Flax NNX's), moves values to and from the host for checkpoints and
summaries, enters `jax.named_scope` while tracing, and builds loops (`make_loop`).
It delegates the real work to the other modules of this package. Where its
docstrings say "the module docstring" they mean the package's, in `__init__.py`,
which also creates the one instance, `BACKEND`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from looproto import _nest, distributed
from looproto.backends._common import ComputeMetricAdapter, python_loop
from looproto.backends._keras import keras_refusal
from looproto.backends.base import Loop, LoopOptions, StepFn
from looproto.backends.jax._binding import tracer_guard
from looproto.backends.jax._distributed import JaxEngine, initialize_distributed
from looproto.backends.jax._gradients import array_namespace, grad, value_and_grad
from looproto.backends.jax._loop import JaxLoop
from looproto.backends.jax._nnx import (
    expand_nnx,
    is_key_array,
    is_nnx_variable,
    nnx_get,
    nnx_set,
)
from looproto.backends.jax._options import parse_backend_options
from looproto.backends.jax._research import hyperparameters, metric_adapter
from looproto.errors import ProtocolError, ShapeError, value_repr
from looproto.module import Module, Variable

_trace_state_clean: Callable[[], bool] | None
try:  # 0.26 µs; entering jax.named_scope costs ~2 µs, so skip it outside tracing.
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - a future JAX without it: always enter
    _trace_state_clean = None


# The end of the refusal of a Keras object on Keras' JAX backend.
_KERAS_INSTEAD = "hold the state in `looproto.Variable`s or Flax NNX modules"


class JaxBackend:
    """The JAX backend (described in `looproto.backends.jax`)."""

    name = "jax"

    def version(self) -> str:
        """See base class."""
        return str(jax.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `looproto.Variable` and Flax NNX `Variable`s."""
        return isinstance(obj, Variable) or is_nnx_variable(obj)

    def is_trainable(self, obj: Any) -> bool:
        """See base class: NNX `Param`s, and `looproto.Variable(trainable=True)`."""
        if isinstance(obj, Variable):
            return obj.trainable
        nnx = sys.modules.get("flax.nnx")
        param = getattr(nnx, "Param", None)
        return param is not None and isinstance(obj, param)

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: the `nnx.Variable`s of a Flax NNX module, by NNX path.

        A Keras 3 object on Keras' JAX backend is refused (`backends/_keras.py`).
        """
        pairs = expand_nnx(obj)
        return pairs if pairs is not None else keras_refusal(obj, "jax", "JAX", _KERAS_INSTEAD)

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class. A host copy (never a view of a buffer that may be donated).

        A PRNG key array (an NNX `RngKey`) is returned as its raw key data.
        """
        if isinstance(value, Variable):
            value = value.value
        elif is_nnx_variable(value):
            value = nnx_get(value)
        if is_key_array(value):
            value = jax.random.key_data(value)
        return np.array(jax.device_get(value))

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class. Keeps the dtype (same-kind casts only) and the sharding."""
        nnx_variable = not isinstance(variable, Variable)
        current = nnx_get(variable) if nnx_variable else variable.value
        key_impl = None
        if is_key_array(current):  # Restore key data into a typed key of the same impl.
            key_impl = jax.random.key_impl(current)
            current = jax.random.key_data(current)
        array = np.asarray(array)
        if tuple(current.shape) != tuple(array.shape):
            raise ShapeError(
                f"Cannot assign an array of shape {array.shape} to {_name(variable)!r} of "
                f"shape {tuple(current.shape)}."
            )
        if array.dtype != current.dtype:
            if not np.can_cast(array.dtype, current.dtype, casting="same_kind"):
                raise ShapeError(
                    f"Cannot assign an array of dtype {array.dtype} to {_name(variable)!r} of "
                    f"dtype {current.dtype}."
                )
            array = array.astype(current.dtype)
        if isinstance(current, jax.Array):
            new: Any = jax.device_put(array, current.sharding)
        else:
            new = np.array(array, copy=True)
        if key_impl is not None:
            new = jax.random.wrap_key_data(new, impl=key_impl)
        if nnx_variable:
            nnx_set(variable, new)  # NumPy stays NumPy, as the Variable held it.
        else:
            variable._value = new

    def to_host(self, tree: Any) -> Any:
        """See base class: every leaf's transfer starts before the first is waited for.

        This is `jax.device_get` (an explicit transfer, allowed under a transfer
        guard) at about half its fixed cost, which is paid once per loop.
        """
        # Both inside the "allow": on an accelerator starting the copy is a guarded
        # device-to-host transfer too (on CPU nothing is).
        with jax.transfer_guard_device_to_host("allow"):
            for leaf in jax.tree.leaves(tree):
                if isinstance(leaf, jax.Array):
                    leaf.copy_to_host_async()
            return _nest.map_output(_nest.to_numpy_leaf, tree)

    def name_scope(self, scope: str) -> contextlib.AbstractContextManager[Any]:
        """See base class: `jax.named_scope`, entered only while tracing (else ~2 µs)."""
        if _trace_state_clean is not None and _trace_state_clean():
            return contextlib.nullcontext()
        return jax.named_scope(scope.rstrip("/"))

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> Loop:
        """See base class and the module docstring.

        `compile_loop` (default): one `jax.jit(lax.scan)` call per loop; with a
        `reduce_fn` (an evaluator reducing into Python state) it falls back to a
        jitted step in a Python loop. `compile_step` only: a jitted step in a
        Python loop. Neither: the eager `python_loop`.
        """
        if not callable(step_fn):
            raise ProtocolError(f"`step_fn` must be callable; received {value_repr(step_fn)}.")
        parsed = parse_backend_options(options.backend_options)
        if not options.compile_step:
            return python_loop(step_fn)
        return JaxLoop(step_fn, module, scan=options.compile_loop, **parsed)

    def array_namespace(self) -> Any:
        """See `looproto.backends.jax.array_namespace`."""
        return array_namespace()

    # The gradient helpers, also as methods (`backends.get("jax").value_and_grad`).
    def value_and_grad(
        self, fn: Callable[[], Any], module: Any, has_aux: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """See `looproto.backends.jax.value_and_grad`."""
        return value_and_grad(fn, module, has_aux=has_aux)

    def grad(self, fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
        """See `looproto.backends.jax.grad`."""
        return grad(fn, module, has_aux=has_aux)

    def initialize_distributed(self, timeout: float = distributed.DEFAULT_TIMEOUT) -> JaxEngine:
        """See `looproto.backends.jax.initialize_distributed`."""
        return initialize_distributed(timeout)

    def hyperparameters(self, obj: Any) -> dict[str, float] | None:
        """See base class: an optax state of `optax.inject_hyperparams`."""
        return hyperparameters(obj)

    def metric_adapter(self, obj: Any) -> ComputeMetricAdapter | None:
        """See base class: Flax NNX metrics."""
        return metric_adapter(obj)

    def on_assign(self, variable: Any, value: Any) -> None:
        """See `looproto.backends.SupportsAssignHook`: refuses tracers outside a trace."""
        tracer_guard(variable, value)


def _name(variable: Any) -> str:
    return str(getattr(variable, "name", type(variable).__name__))


BACKEND = JaxBackend()
