"""Gradients over a Module: `value_and_grad`, `grad`, and the array API namespace of tensors.

The functional helpers a step (or a portable model) calls, by variable path like
`looproto.backends.jax.value_and_grad`; separate from the loop because they work
inside and outside it, compiled or eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:  # Imported with the backend: inside `torch.compile`d code an import could break the graph.
    import array_api_compat.torch as _array_api
except ImportError:  # pragma: no cover - array-api-compat is in looproto's `portable` extra
    _array_api = None  # type: ignore[assignment]

from looproto import _nest
from looproto.backends._common import split_aux
from looproto.backends.torch._discovery import shallow_walk
from looproto.backends.torch._tensors import tensor_of
from looproto.errors import BackendNotAvailableError, ProtocolError, value_repr
from looproto.module import Variable, variables_by_path


def _grad_targets(module: Any) -> list[tuple[str, Any]]:
    """`(path, Parameter or tensor-holding Variable)` for each trainable float tensor."""
    from looproto.module import is_trainable

    targets: list[tuple[str, Any]] = []
    with shallow_walk():
        found = variables_by_path(module, predicate=is_trainable)
    for path, variable in found.items():
        tensor = tensor_of(variable)
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(
                f"Trainable variable {path!r} holds {type(tensor).__name__}, not a torch tensor; "
                "`value_and_grad` differentiates torch tensors. Inside the torch backend's loop "
                "NumPy `looproto.Variable`s are lifted to tensors; outside it, hold a tensor."
            )
        if tensor.is_floating_point() or tensor.is_complex():
            targets.append((path, variable))
    return targets


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable tensors.

    `fn` takes no arguments and reads the module's state, as a step does. The
    gradients come from `torch.autograd.grad`: no `.grad` attribute is touched.
    Parameters are differentiated as they are; a trainable `looproto.Variable`
    holding a tensor (a lifted NumPy Variable, inside a loop) is differentiated
    through a detached leaf copy while `fn` runs. Unused tensors get zeros.

    Args:
        fn: Returns a scalar loss tensor, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or `nn.Module`, or a container of them).
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`; `grads` maps each
        trainable variable's path (as in `variables_by_path`) to its gradient. The
        loss (and tensors in `aux`) are detached.

    Example:
        >>> import torch, looproto
        >>> m = looproto.Module(name="m")
        >>> m.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> loss, grads = value_and_grad(lambda: (m.w ** 2).sum(), m)
        >>> float(loss), grads["w"].tolist()
        (5.0, [2.0, 4.0])
    """
    targets = _grad_targets(module)
    bound: list[tuple[Variable, Any, Any]] = []
    leaves = []
    for _, variable in targets:
        if isinstance(variable, Variable):
            old = variable._value
            leaf = old.detach().requires_grad_(True)
            variable._value = leaf
            bound.append((variable, old, leaf))
            leaves.append(leaf)
        else:
            leaves.append(variable)
    try:
        with torch.enable_grad():
            out = fn()
    finally:
        for variable, old, leaf in bound:
            # Keep what `fn` assigned; undo only our binding.
            variable._value = old if variable._value is leaf else variable._value.detach()
    loss, aux = split_aux(out, has_aux)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ProtocolError(f"`fn` must return a scalar loss tensor; received {value_repr(loss)}.")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else ()
    result = {
        path: g if g is not None else torch.zeros_like(leaf)
        for (path, _), g, leaf in zip(targets, grads, leaves)
    }
    loss = loss.detach()
    if has_aux:
        aux = _nest.map_output(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
        return (loss, aux), result
    return loss, result


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads


def array_namespace() -> Any:
    """The Python array API for torch tensors: `array_api_compat.torch` (see `looproto.portable`).

    It reads no mutable state, so `torch.compile` traces it without guards or recompiles.

    Raises:
        BackendNotAvailableError: `array-api-compat` is not installed.
    """
    if _array_api is None:
        raise BackendNotAvailableError(
            "The array API namespace of torch tensors is array-api-compat's, which is not "
            "installed. Install it with: pip install 'looproto[portable]'"
        )
    return _array_api
