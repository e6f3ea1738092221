"""Gradients over a Module: `value_and_grad` and `grad` on a `tf.GradientTape`.

The TensorFlow counterparts of the JAX and PyTorch backends' helpers: they find the
module's trainable floating-point variables (Keras variables and, inside a loop,
lifted NumPy Variables included), differentiate a loss with respect to them, and key
the gradients by variable path. Public as `looproto.backends.tensorflow.value_and_grad`
and `.grad`, and as methods of the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from looproto.backends._common import split_aux
from looproto.backends.tensorflow._lifting import bound_twin
from looproto.backends.tensorflow._variables import is_keras_variable
from looproto.errors import ProtocolError, value_repr
from looproto.module import Variable, variables_by_path


@tf.autograph.experimental.do_not_convert
def _grad_targets(module: Any) -> tuple[list[str], list[Any]]:
    """Paths and watchable variables of `module`'s trainable floating-point variables."""
    from looproto.module import is_trainable

    paths: list[str] = []
    targets: list[Any] = []
    for path, variable in variables_by_path(module, predicate=is_trainable).items():
        if isinstance(variable, Variable):
            target = bound_twin(variable)
            if target is None:
                raise ProtocolError(
                    f"Trainable variable {path!r} is a `looproto.Variable` holding "
                    f"{type(variable.value).__name__}; TensorFlow differentiates "
                    "`tf.Variable`s. Inside the TensorFlow backend's loops NumPy Variables "
                    "are lifted into `tf.Variable`s; outside them, hold `tf.Variable`s."
                )
        elif is_keras_variable(variable):
            target = variable.value  # The `tf.Variable` behind a Keras 3 variable.
        else:
            target = variable
        if target.dtype.is_floating or target.dtype.is_complex:
            paths.append(path)
            targets.append(target)
    return paths, targets


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable variables.

    The counterpart of `looproto.backends.jax.value_and_grad` and
    `looproto.backends.torch.value_and_grad`, on a `tf.GradientTape`: `fn` takes no
    arguments and reads the module's state, as a step does. Works eagerly and inside
    `tf.function`. The variables differentiated are the trainable floating-point
    `tf.Variable`s (Keras variables included) and, inside a loop of this backend, the
    lifted NumPy `looproto.Variable`s. Gradients are not all-reduced across replicas
    (under a `tf.distribute` strategy, reduce them as Orbit steps do).

    Args:
        fn: Returns a scalar loss, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or a container of them).
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`; `grads` maps each
        differentiated variable's path (as in `variables_by_path`) to its gradient, a
        dense tensor (zeros for a variable the loss does not depend on).

    Raises:
        ProtocolError: `fn` did not return a scalar (or a pair with `has_aux`), or a
            trainable `looproto.Variable` holds a NumPy array outside a loop.

    Example:
        >>> import tensorflow as tf, looproto
        >>> m = looproto.Module(name="m")
        >>> m.w = tf.Variable([1.0, 2.0])
        >>> loss, grads = value_and_grad(lambda: tf.reduce_sum(m.w**2), m)
        >>> float(loss), grads["w"].numpy().tolist()
        (5.0, [2.0, 4.0])
    """
    paths, targets = _grad_targets(module)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(targets)
        out = fn()
    loss, aux = split_aux(out, has_aux)
    if not tf.is_tensor(loss) or loss.shape.num_elements() != 1:
        raise ProtocolError(f"`fn` must return a scalar loss tensor; received {value_repr(loss)}.")
    grads = tape.gradient(loss, targets, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    result = {
        # An embedding lookup's gradient is `IndexedSlices`; the optimizers want dense ones.
        path: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
        for path, g in zip(paths, grads)
    }
    return ((loss, aux) if has_aux else loss), result


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads
