"""Models written once against the Python array API, trained on JAX, PyTorch or TensorFlow.

A *portable* model keeps its state in `looproto.Variable`s holding NumPy arrays and
does its math with the array API namespace of the arrays it is given::

    class Dense(looproto.Module):
        def __init__(self, w, b):
            super().__init__()
            self.w = looproto.Variable(w)
            self.b = looproto.Variable(b)

        def __call__(self, x):
            xp = portable.array_namespace(x)
            return xp.tanh(x @ self.w.value + self.b.value)

Every backend lifts such Variables into its framework while a loop runs (into the
`jax.jit` call, onto the torch device, into `tf.Variable` twins) and writes them
back as NumPy after it, so the same code runs under each backend's compiled inner
loop, and a checkpoint written under one backend restores under any other: it is
the same tree of plain arrays. Gradients come from the backend
(`value_and_grad(fn, module, backend=...)`); the optimizers here (`SGD`, `Adam`)
are written against the array API too, so their state is the same tree everywhere.
They take a learning-rate schedule (`looproto.schedules`), decoupled weight decay
and gradient clipping (`clipvalue`, `clipnorm`, `global_clipnorm`, Keras's names).
The NumPy backend runs the model's forward pass (evaluation, serving a checkpoint)
but cannot differentiate.

The namespaces: `jax.numpy` for JAX arrays, `array_api_compat.torch` for torch
tensors, `tf.experimental.numpy` (plus the standard names it lacks) for TensorFlow
tensors, `array_api_compat.numpy` (or NumPy >= 2.1 itself) for NumPy arrays. This module
imports no framework: each backend supplies its own (`Backend.array_namespace`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from looproto import backends
from looproto.backends.base import Backend, SupportsArrayAPI, SupportsGradients
from looproto.errors import BackendNotAvailableError, ConfigError, ProtocolError, value_repr
from looproto.module import (
    Module,
    Variable,
    is_trainable,
    variable_to_numpy,
    variables_by_path,
)

__all__ = ["SGD", "Adam", "Optimizer", "array_namespace", "value_and_grad"]

_NAMESPACES: dict[type, Any] = {}
_NUMBERS = (bool, int, float, complex)


def _namespace(x: Any) -> Any:
    """The array API namespace of one array, from its backend, cached by type.

    Plain Python that AutoGraph can convert (no for/else, no annotated names in
    branches), should `tf.function` ever trace it. A compiled torch step meets only
    types seen before it was traced (its tensors), so the cache does not change under it.
    """
    cls = type(x)
    found = _NAMESPACES.get(cls)
    if found is not None:
        return found
    if isinstance(x, (np.ndarray, np.generic)):
        xp = backends.get("numpy").array_namespace()  # type: ignore[attr-defined]
    else:
        able = [b for b in backends.for_object(x) if isinstance(b, SupportsArrayAPI)]
        if able:
            xp = able[0].array_namespace()
        else:
            own = getattr(x, "__array_namespace__", None)
            if not callable(own):
                raise ProtocolError(
                    f"No array API namespace is known for {value_repr(x)} of type "
                    f"{cls.__module__}.{cls.__qualname__}; expected an array of a backend "
                    "that supports the array API (NumPy, JAX, PyTorch, TensorFlow), or an "
                    "array with `__array_namespace__`."
                )
            xp = own()
    _NAMESPACES[cls] = xp
    return xp


def array_namespace(*arrays: Any) -> Any:
    """The Python array API namespace of `arrays` (`xp` in array-API code).

    `looproto.Variable`s stand for the arrays they hold; Python numbers and None are
    skipped, as the standard's `array_namespace` does.

    Example:
        >>> import numpy as np
        >>> xp = array_namespace(np.ones(3, np.float32))
        >>> float(xp.sum(xp.tanh(xp.zeros(3))))
        0.0

    Raises:
        ProtocolError: There is no array among `arrays`, the arrays come from different
            frameworks, or no namespace is known for one of them.
    """
    xp: Any = None
    for x in arrays:
        if isinstance(x, Variable):
            x = x.value
        if x is None or isinstance(x, _NUMBERS):
            continue
        found = _namespace(x)
        if xp is None:
            xp = found
        elif found is not xp:
            kinds = sorted({type(a).__module__.partition(".")[0] for a in arrays})
            raise ProtocolError(
                f"`array_namespace` received arrays of several frameworks ({kinds}); a "
                "computation must use one. Inside a backend's loop the model's Variables and "
                "the batch are that backend's arrays; convert constants with `xp.asarray`."
            )
    if xp is None:
        raise ProtocolError(
            f"`array_namespace` needs at least one array; received only Python numbers or "
            f"None: {value_repr(arrays)}."
        )
    return xp


def value_and_grad(
    fn: Callable[[], Any],
    module: Any,
    *,
    backend: str | Backend,
    has_aux: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """`fn()` and its gradient with respect to `module`'s trainable variables, on `backend`.

    The backend's own `value_and_grad` (`jax.value_and_grad`, `torch.autograd.grad`,
    `tf.GradientTape`); the gradients are keyed by the variables' paths in `module`
    (as in `variables_by_path`), the key space the optimizers here take.

    Args:
        fn: Takes no arguments, reads the module's Variables, returns a scalar loss (or
            `(loss, aux)` with `has_aux`).
        module: The module whose trainable floating-point variables are differentiated.
        backend: The backend running the step: its name or the backend object (a
            trainer knows it from its options).
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`.

    Raises:
        ConfigError: The backend cannot differentiate (the NumPy backend).
    """
    resolved = backends.get(backend) if isinstance(backend, str) else backend
    if not isinstance(resolved, SupportsGradients):
        raise ConfigError(
            f"The `{resolved.name}` backend cannot differentiate (it has no "
            f"`value_and_grad`), so it cannot train a portable model; train on one of "
            f"{_differentiating_backends()}. The `{resolved.name}` backend can still evaluate "
            "the model and restore its checkpoints."
        )
    return resolved.value_and_grad(fn, module, has_aux=has_aux)


def _differentiating_backends() -> list[str]:
    # Only for an error message: loading each backend imports its framework.
    able = []
    for name in backends.available():
        try:
            if isinstance(backends.get(name), SupportsGradients):
                able.append(name)
        except (BackendNotAvailableError, ConfigError):
            continue
    return able


# ----------------------------------------------------------------------------
# Optimizers


def _is_float(variable: Any) -> bool:
    return bool(np.issubdtype(np.dtype(variable.dtype), np.inexact))


def _positive(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"`{argument}` must be a positive number; received {value_repr(value)}.")
    return float(value)


def _optional_positive(value: Any, argument: str) -> float | None:
    return None if value is None else _positive(value, argument)


def _learning_rate(value: Any) -> float | Callable[[Any], Any]:
    """A positive number, or a schedule (a callable of the update count)."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    return _positive(value, "learning_rate")


def _fraction(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"`{argument}` must be a number in [0, 1); received {value_repr(value)}.")
    return float(value)


class Optimizer(Module, metaclass=abc.ABCMeta):
    """Updates a module's trainable floating-point Variables from gradients keyed by path.

    The parameters are found once, at construction, with `variables_by_path`; slot
    variables (momentum, moments) are `looproto.Variable`s holding NumPy arrays,
    stored by the parameter's path, so the optimizer's state is the same checkpoint
    tree on every backend. Subclasses implement `_update(path, param, grad, context)`,
    and `_prepare(learning_rate)` for what all parameters' updates of one step share
    (it gets this update's learning rate; its result is the `context`).

    Each `apply` clips the gradients (one of `clipvalue`, `clipnorm`,
    `global_clipnorm`), takes this update's learning rate (the schedule at the count
    of earlier updates, kept in the int64 slot `iterations`), decays the weights
    (`param -= learning_rate * weight_decay * param`, decoupled from the gradient, as
    AdamW and Keras do) and then updates them.

    Args:
        module: The model whose trainable floating-point `looproto.Variable`s it updates.
        learning_rate: The step size: a positive number, or a schedule, a callable of
            the update count (`looproto.schedules`, or array-API code of your own).
        name: The module name (its slots are named under it).
        weight_decay: Decoupled weight decay (0: none).
        clipvalue: Clip each gradient element to `[-clipvalue, clipvalue]`.
        clipnorm: Scale each gradient down to this L2 norm at most.
        global_clipnorm: Scale all gradients together down to this global L2 norm at most.

    Raises:
        ConfigError: `module` has no trainable floating-point variables, a
            hyper-parameter is out of range, or more than one clipping is given.
        ProtocolError: A trainable variable is not a `looproto.Variable` (a framework's
            own variable is updated by that framework's optimizer).
    """

    # The parameters belong to the model: a walk of the trainer must find them there.
    _TF_MODULE_IGNORED_PROPERTIES: ClassVar[frozenset[str]] = frozenset({"_params"})
    # Whether this optimizer counts its updates even with a constant learning rate.
    _counts_updates: ClassVar[bool] = False

    def __init__(
        self,
        module: Any,
        learning_rate: float | Callable[[Any], Any],
        name: str | None = None,
        *,
        weight_decay: float = 0.0,
        clipvalue: float | None = None,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
    ) -> None:
        super().__init__(name=name)
        self.learning_rate = _learning_rate(learning_rate)
        # 0 (the default) is no decay; anything else must be a positive number.
        self.weight_decay = 0.0 if weight_decay == 0 else _positive(weight_decay, "weight_decay")
        clips = {"clipvalue": clipvalue, "clipnorm": clipnorm, "global_clipnorm": global_clipnorm}
        given = [name for name, value in clips.items() if value is not None]
        if len(given) > 1:
            raise ConfigError(
                f"Pass at most one of `clipvalue`, `clipnorm`, `global_clipnorm`; received {given}."
            )
        self.clipvalue, self.clipnorm, self.global_clipnorm = (
            _optional_positive(value, name) for name, value in clips.items()
        )
        if self._counts_updates or callable(self.learning_rate):
            with self.name_scope:
                self.iterations = Variable(np.int64(0), trainable=False, name="iterations")
        params: dict[str, Variable] = {}
        for path, variable in variables_by_path(module, predicate=is_trainable).items():
            if not isinstance(variable, Variable):
                raise ProtocolError(
                    f"Trainable variable {path!r} is a {type(variable).__name__}; "
                    f"`{type(self).__name__}` updates `looproto.Variable`s. Use the "
                    "framework's own optimizer for its variables."
                )
            if _is_float(variable):
                params[path] = variable
        if not params:
            raise ConfigError(
                f"{value_repr(module)} has no trainable floating-point variables for "
                f"`{type(self).__name__}` to update."
            )
        self._params = params

    def _slots(self, label: str) -> dict[str, Variable]:
        """One zero-filled NumPy Variable per parameter, by the parameter's path."""
        with self.name_scope:
            return {
                path: Variable(
                    np.zeros_like(variable_to_numpy(param)),
                    trainable=False,
                    name=f"{label}/{path}",
                )
                for path, param in self._params.items()
            }

    @property
    def parameters(self) -> dict[str, Variable]:
        """The Variables this optimizer updates, by path (a copy)."""
        return dict(self._params)

    def _check(self, grads: Mapping[str, Any]) -> None:
        params = self._params
        if len(grads) == len(params) and all(path in grads for path in params):
            return
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ProtocolError(
            f"`{type(self).__name__}.apply` needs one gradient per parameter, by path; "
            f"missing {missing}, unexpected {extra}. Differentiate the module the "
            "optimizer was built for (`value_and_grad(fn, model, ...)`)."
        )

    def apply(self, grads: Mapping[str, Any]) -> None:
        """Updates every parameter with its gradient (`grads[path]`).

        Raises:
            ProtocolError: `grads` does not have exactly one entry per parameter.
        """
        self._check(grads)
        grads = self._clip(grads)
        rate: Any = self.learning_rate
        if hasattr(self, "iterations"):
            count = self.iterations.value
            if callable(rate):
                rate = rate(count)
            self.iterations.assign(count + 1)
        context = self._prepare(rate)
        decay = self.weight_decay
        for path, param in self._params.items():
            if decay:
                param.assign(param.value - (rate * decay) * param.value)
            self._update(path, param, grads[path], context)

    def _clip(self, grads: Mapping[str, Any]) -> Mapping[str, Any]:
        """`grads` clipped as `clipvalue`, `clipnorm` or `global_clipnorm` says."""
        if self.clipvalue is not None:
            limit = self.clipvalue
            return {p: array_namespace(g).clip(g, -limit, limit) for p, g in grads.items()}
        if self.clipnorm is not None:
            limit = self.clipnorm
            return {p: g * _shrink(array_namespace(g), [g], limit) for p, g in grads.items()}
        if self.global_clipnorm is not None:
            xp = array_namespace(*grads.values())
            factor = _shrink(xp, list(grads.values()), self.global_clipnorm)
            return {p: g * factor for p, g in grads.items()}
        return grads

    def hyperparameters(self) -> dict[str, float]:
        """What the next update applies: `learning_rate` (the schedule at `iterations`), ...

        The names `looproto.actions.LearningRateMonitor` summarises.
        """
        rate: Any = self.learning_rate
        if callable(rate):
            rate = float(np.asarray(rate(int(self.iterations.numpy()))))
        out = {"learning_rate": float(rate)}
        if self.weight_decay:
            out["weight_decay"] = self.weight_decay
        return out

    def _prepare(self, learning_rate: Any) -> Any:
        """Runs once per `apply`, before the updates; its result is their `context`.

        Args:
            learning_rate: This update's rate (an array of the running backend when it
                comes from a schedule; keep it local, never on an attribute).
        """
        return learning_rate

    @abc.abstractmethod
    def _update(self, path: str, param: Variable, grad: Any, context: Any) -> None:
        """Updates `param` (at `path`) from its gradient `grad`."""


def _shrink(xp: Any, grads: list[Any], limit: float) -> Any:
    """The factor that scales the joint L2 norm of `grads` down to `limit` at most."""
    norm = xp.sqrt(sum(xp.sum(g * g) for g in grads))
    return limit / xp.maximum(norm, limit)


class SGD(Optimizer):
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    With momentum `m` and learning rate `lr`, each step is `v = m * v - lr * g`, then
    `p = p + v` (or `p = p + m * v - lr * g` with `nesterov`): Keras's and
    `looproto.examples.numpy_mlp`'s convention, which equals PyTorch's `SGD` for a
    constant learning rate. The velocities are slots `velocity/<parameter path>`.

    Example:
        >>> import looproto
        >>> model = looproto.Module(name="model")
        >>> model.w = looproto.Variable(np.ones(2, np.float32))
        >>> sgd = SGD(model, learning_rate=0.5, momentum=0.9)
        >>> sgd.apply({"w": np.array([1.0, -1.0], np.float32)})
        >>> model.w.numpy().tolist(), sorted(sgd.velocity)
        ([0.5, 1.5], ['w'])
    """

    def __init__(
        self,
        module: Any,
        learning_rate: float | Callable[[Any], Any] = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        name: str | None = None,
        **options: Any,
    ) -> None:
        """See the class docstring; `options` are `Optimizer`'s keyword arguments."""
        super().__init__(module, learning_rate, name=name, **options)
        self.momentum = _fraction(momentum, "momentum")
        if not isinstance(nesterov, bool):
            raise ConfigError(f"`nesterov` must be a bool; received {value_repr(nesterov)}.")
        if nesterov and not self.momentum:
            raise ConfigError("`nesterov=True` needs a `momentum` above 0; received momentum=0.")
        self.nesterov = nesterov
        self.velocity = self._slots("velocity") if self.momentum else {}

    def hyperparameters(self) -> dict[str, float]:
        """See base class; with `momentum` when there is some."""
        out = super().hyperparameters()
        if self.momentum:
            out["momentum"] = self.momentum
        return out

    def _update(self, path: str, param: Variable, grad: Any, context: Any) -> None:
        lr, momentum = context, self.momentum
        if not momentum:
            param.assign(param.value - lr * grad)
            return
        velocity = self.velocity[path]
        new = momentum * velocity.value - lr * grad
        velocity.assign(new)
        param.assign(param.value + (momentum * new - lr * grad if self.nesterov else new))


class Adam(Optimizer):
    """Adam (Kingma & Ba), in Keras's form.

    Each step `t` (counted in the int64 slot `iterations`): `m = b1 * m + (1 - b1) * g`,
    `v = b2 * v + (1 - b2) * g**2`, then `p = p - lr_t * m / (sqrt(v) + epsilon)` with
    `lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)`. The moments are slots `m/<path>` and
    `v/<path>`.
    """

    _counts_updates = True  # the bias correction needs the count

    def __init__(
        self,
        module: Any,
        learning_rate: float | Callable[[Any], Any] = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        name: str | None = None,
        **options: Any,
    ) -> None:
        """See the class docstring; `options` are `Optimizer`'s keyword arguments."""
        super().__init__(module, learning_rate, name=name, **options)
        self.beta_1 = _fraction(beta_1, "beta_1")
        self.beta_2 = _fraction(beta_2, "beta_2")
        self.epsilon = _positive(epsilon, "epsilon")
        self.m = self._slots("m")
        self.v = self._slots("v")

    def _prepare(self, learning_rate: Any) -> Any:
        return learning_rate, self.iterations.value  # the rate; this update's number (from 1)

    def hyperparameters(self) -> dict[str, float]:
        """See base class; with `beta_1` and `beta_2`."""
        return {**super().hyperparameters(), "beta_1": self.beta_1, "beta_2": self.beta_2}

    def _update(self, path: str, param: Variable, grad: Any, context: Any) -> None:
        b1, b2 = self.beta_1, self.beta_2
        rate, count = context
        value = param.value
        xp = array_namespace(value)
        t = xp.astype(count, value.dtype)
        lr_t = rate * xp.sqrt(1 - b2**t) / (1 - b1**t)
        m, v = self.m[path], self.v[path]
        new_m = b1 * m.value + (1 - b1) * grad
        new_v = b2 * v.value + (1 - b2) * grad * grad
        m.assign(new_m)
        v.assign(new_v)
        param.assign(value - lr_t * new_m / (xp.sqrt(new_v) + self.epsilon))
