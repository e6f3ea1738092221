"""The NumPy backend: the reference implementation and the default.

It needs no framework. Its inner loop is a plain Python loop, which also makes it
the eager reference for any framework: a step written in PyTorch or TensorFlow
runs unchanged under it, just without compilation. Variables are
`looproto.Variable`s holding NumPy arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from looproto import _nest, backends
from looproto.backends._common import python_loop
from looproto.backends.base import Loop, LoopOptions, StepFn
from looproto.errors import BackendNotAvailableError, ConfigError, ProtocolError, ShapeError
from looproto.module import Module, Variable

__all__ = ["BACKEND", "NumpyBackend", "array_namespace", "python_loop"]


def array_namespace() -> Any:
    """The Python array API for NumPy arrays (see `looproto.portable`).

    `array_api_compat.numpy` when it is installed (`pip install 'looproto[portable]'`),
    which smooths NumPy's last deviations from the standard; else NumPy itself from
    2.1 on, whose main namespace follows the standard (2.0 lacks `astype`).

    Raises:
        BackendNotAvailableError: NumPy before 2.1 without `array-api-compat`.
    """
    try:
        import array_api_compat.numpy as xp
    except ImportError as err:
        major, minor = (int(part) for part in np.__version__.split(".")[:2])
        if (major, minor) >= (2, 1):
            return np
        raise BackendNotAvailableError(
            f"The array API namespace of NumPy {np.__version__} needs array-api-compat "
            f"({err}). Install it with: pip install 'looproto[portable]'"
        ) from err
    return xp


class NumpyBackend:
    """See the module docstring."""

    name = "numpy"

    def version(self) -> str:
        """See base class."""
        return np.__version__

    def is_variable(self, obj: Any) -> bool:
        """See base class. (Only `looproto.Variable`, which the core knows itself.)"""
        return isinstance(obj, Variable)

    def is_trainable(self, obj: Any) -> bool:
        """See base class."""
        return bool(getattr(obj, "trainable", False))

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class. NumPy has no containers of its own."""
        return None

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class."""
        return np.array(value)

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class."""
        current = variable.value
        if tuple(current.shape) != tuple(array.shape) or current.dtype != array.dtype:
            raise ShapeError(
                f"Cannot assign an array of shape {array.shape} and dtype {array.dtype} to "
                f"{variable.name!r} of shape {tuple(current.shape)} and dtype {current.dtype}."
            )
        variable.assign(np.array(array, copy=True))

    def to_host(self, tree: Any) -> Any:
        """See base class."""
        return _nest.map_output(_nest.to_numpy_leaf, tree)

    def name_scope(self, scope: str) -> contextlib.nullcontext[None]:
        """See base class. NumPy has no scopes of its own."""
        return contextlib.nullcontext()

    def array_namespace(self) -> Any:
        """See `looproto.backends.numpy.array_namespace`."""
        return array_namespace()

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> Loop:
        """See base class. Always a Python loop; the compile options do not apply."""
        if options.backend_options:
            raise ConfigError(
                f"The numpy backend takes no `backend_options`; received "
                f"{dict(options.backend_options)!r}."
            )
        if not callable(step_fn):
            raise ProtocolError(f"`step_fn` must be callable; received {step_fn!r}.")
        return python_loop(step_fn)


BACKEND = NumpyBackend()
backends.register(BACKEND, aliases=("np",))
