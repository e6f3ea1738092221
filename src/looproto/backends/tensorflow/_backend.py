"""`TensorflowBackend`: the `looproto.backends.Backend` of the TensorFlow package.

The class that `looproto.backends.get("tensorflow")` returns (as the package's
`BACKEND`), and the one place where the package's parts meet: variable discovery,
host transfers, name scopes, and the entry points to the loop, the gradient helpers,
the array API, checkpointed iterator positions and multi-worker set-up, each of which
lives in a module of its own. "The module docstring" in its docstrings is the
package's, `looproto.backends.tensorflow`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from looproto import _nest, distributed, portable
from looproto.backends.base import LoopOptions, StepFn, Unsaveable
from looproto.backends.tensorflow._array_api import array_namespace
from looproto.backends.tensorflow._checkpoints import TfDataIteratorState, iterator_state
from looproto.backends.tensorflow._distributed import TensorflowEngine, initialize_distributed
from looproto.backends.tensorflow._gradients import grad, value_and_grad
from looproto.backends.tensorflow._keras import (
    TF_KERAS_OPTIMIZER,
    is_keras_object,
    is_tf_keras_optimizer,
    keras_pairs,
)
from looproto.backends.tensorflow._lifting import variable_assign_hook
from looproto.backends.tensorflow._loop import TensorflowLoop
from looproto.backends.tensorflow._options import check_settings
from looproto.backends.tensorflow._research import (
    KerasMetricAdapter,
    hyperparameters,
    metric_adapter,
)
from looproto.backends.tensorflow._tf_checkpoints import checkpoint_paths
from looproto.backends.tensorflow._variables import (
    is_keras_variable,
    keras_module,
    variable_dtype,
)
from looproto.errors import ProtocolError, ShapeError, value_repr
from looproto.module import Module, Variable


class TensorflowBackend:
    """The TensorFlow backend (described in `looproto.backends.tensorflow`)."""

    name = "tensorflow"

    def version(self) -> str:
        """See base class."""
        return str(tf.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `tf.Variable` (distributed too) and Keras 3 variables on TF."""
        return isinstance(obj, tf.Variable) or is_keras_variable(obj)

    def is_trainable(self, obj: Any) -> bool:
        """See base class."""
        return bool(getattr(obj, "trainable", False))

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: the state of a `tf.Module`, of Keras 3 objects and of a
        `tf.train.Checkpoint`.

        `tf.Module` paths are its attribute paths (`("layers", 0, "w")`); a Keras
        layer, model, optimizer, metric or `SeedGenerator` is walked by attribute too
        (`("dense", "kernel")`), see `_keras.py`; a `tf.train.Checkpoint`'s paths start
        with the names it was given (`("model", "dense", "kernel")`).
        """
        if isinstance(obj, (tf.Variable, tf.Tensor)):
            return None
        if isinstance(obj, tf.Module):
            return list(obj._flatten(predicate=self.is_variable, with_path=True))
        if isinstance(obj, tf.train.Checkpoint):
            return checkpoint_paths(obj, self.expand, self.is_variable)
        if is_tf_keras_optimizer(obj):
            return [((), Unsaveable(TF_KERAS_OPTIMIZER))]
        keras = keras_module()
        if keras is not None and is_keras_object(obj, keras):
            return keras_pairs(obj, keras, (tf.Variable, keras.Variable))
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
        dtype = variable_dtype(variable)
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
        settings = check_settings(options.backend_options)
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

    def on_assign(self, variable: Any, value: Any) -> bool | None:
        """See `looproto.backends.SupportsAssignHook`.

        Writes a lifted Variable through to its `tf.Variable` twin; outside a loop,
        catches an assignment made while TensorFlow traces a function.
        """
        return variable_assign_hook(variable, value)

    def hyperparameters(self, obj: Any) -> dict[str, float] | None:
        """See base class: a Keras optimizer's (Keras on TensorFlow)."""
        return hyperparameters(obj)

    def metric_adapter(self, obj: Any) -> KerasMetricAdapter | None:
        """See base class: Keras metrics (Keras on TensorFlow)."""
        return metric_adapter(obj)

    def numpy_dtype(self, dtype: Any) -> np.dtype[Any]:
        """See `looproto.backends.SupportsDtypes`: `tf.DType`s by `as_numpy_dtype`."""
        if isinstance(dtype, tf.DType):
            return np.dtype(dtype.as_numpy_dtype)
        return np.dtype(dtype)


BACKEND = TensorflowBackend()

# AutoGraph (`tf.function`) would convert looproto's plain-Python array dispatchers and
# everything they call on a cache miss, warning about code it cannot convert; the
# attribute it reads to recognise its own artifacts makes it call them as they are.
for _function in (portable.array_namespace, portable.value_and_grad):
    setattr(_function, "autograph_info__", None)  # noqa: B010 (not a name mypy knows)
