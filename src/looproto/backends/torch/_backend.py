"""The backend object: `TorchBackend`, what looproto's core calls for torch objects.

Variables and discovery (`is_variable`, `expand`), host values (`to_numpy`,
`assign`, `to_host`), profiler scopes, the loop factory (`make_loop`) and the
gradient and distributed helpers as methods. Each method delegates to the file that
holds its concept; "the module docstring" below is the package's
(`looproto.backends.torch`). The one instance, `BACKEND`, is made in `__init__.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from looproto import _nest, distributed
from looproto.backends._common import ComputeMetricAdapter
from looproto.backends._keras import keras_refusal
from looproto.backends.base import Loop, LoopOptions, StepFn
from looproto.backends.torch._data import (
    StateDictAdapter,
    iterator_state,
    tensor_from_json,
    tensor_to_json,
)
from looproto.backends.torch._device import device_ops
from looproto.backends.torch._discovery import (
    module_pairs,
    optimizer_pairs,
    own_tensors,
    unwrap,
    walk_state,
)
from looproto.backends.torch._distributed import TorchEngine, initialize_distributed
from looproto.backends.torch._gradients import array_namespace, grad, value_and_grad
from looproto.backends.torch._loop import NULL_SCOPE, TorchLoop
from looproto.backends.torch._options import parse_backend_options
from looproto.backends.torch._research import hyperparameters, metric_adapter
from looproto.backends.torch._state_dicts import is_state_dict_object, state_dict_pairs
from looproto.backends.torch._tensors import (
    fill_tensor,
    np_dtype,
    tensor_of,
    to_numpy_tensor,
    write_tensor,
)
from looproto.backends.torch._views import GeneratorView, View
from looproto.errors import ProtocolError, value_repr

if TYPE_CHECKING:
    from looproto.module import Module


# The end of the refusal of a Keras object on Keras' torch backend.
_KERAS_INSTEAD = "use torch modules and optimizers"


class _Leaf:
    """Marks where the `index`-th fetched tensor goes in `to_host`'s result."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class TorchBackend:
    """The PyTorch backend (described in `looproto.backends.torch`)."""

    name = "torch"

    def version(self) -> str:
        """See base class."""
        return str(torch.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `torch.nn.Parameter`s (buffers and optimizer state come as views)."""
        return isinstance(obj, torch.nn.Parameter)

    def is_trainable(self, obj: Any) -> bool:
        """See base class: `requires_grad`."""
        return bool(getattr(tensor_of(obj), "requires_grad", False))

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: `nn.Module`s, optimizers, `torch.Generator`s, and objects saved
        through their `state_dict()` (LR schedulers, `GradScaler`, ...). Keras 3 objects
        on Keras' torch backend are refused (`backends/_keras.py`)."""
        refused = keras_refusal(obj, "torch", "torch", _KERAS_INSTEAD)
        if refused is not None:
            return refused
        if isinstance(obj, torch.nn.Module):
            if getattr(walk_state, "tensors_only", False):  # The loop's walk: devices only.
                modules = unwrap(obj).modules()
                return [((), t) for m in modules for t in own_tensors(m) if t is not None]
            return module_pairs(obj)
        if isinstance(obj, torch.optim.Optimizer):
            if getattr(walk_state, "shallow", False):
                return []
            return optimizer_pairs(obj, type(obj).__name__.lower())
        if is_state_dict_object(obj):
            if getattr(walk_state, "shallow", False):
                return []
            return state_dict_pairs(obj, type(obj).__name__.lower())
        if isinstance(obj, torch.Generator):
            return (
                [] if getattr(walk_state, "shallow", False) else [((), GeneratorView(obj, "rng"))]
            )
        return None

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class. Always a copy (a CPU tensor's `.numpy()` would share memory)."""
        value = tensor_of(value)
        if isinstance(value, torch.Tensor):
            return to_numpy_tensor(value)
        return np.array(value)

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class. In place: the tensor keeps its identity, device and dtype.

        `array` may also be a Python or NumPy number (`Variable.assign(0.0)` of a
        Variable holding a tensor comes here): written with `fill_`, traceable by
        `torch.compile`.
        """
        if isinstance(variable, View):
            variable._write(np.asarray(array))
            return
        tensor = tensor_of(variable)
        name = str(getattr(variable, "name", "tensor"))
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(
                f"The torch backend assigns tensors; {name!r} holds {type(tensor).__name__}."
            )
        if isinstance(array, (bool, int, float, complex, np.generic)):
            fill_tensor(tensor, array, name)
        else:
            write_tensor(tensor, array, name)

    def to_host(self, tree: Any) -> Any:
        """See base class: all tensors of the tree in one device-to-host transfer."""
        leaves: list[torch.Tensor] = []

        def collect(x: Any) -> Any:
            value = tensor_of(x)
            if isinstance(value, torch.Tensor):
                leaves.append(value)
                return _Leaf(len(leaves) - 1)
            return _nest.to_numpy_leaf(value)

        indexed = _nest.map_output(collect, tree)
        if not leaves:
            return indexed
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(leaves):
            by_device.setdefault(t.device, []).append(i)
        arrays: list[Any] = [None] * len(leaves)
        for device, indices in by_device.items():
            fetched = device_ops(device, None).fetch([leaves[i] for i in indices])
            for i, array in zip(indices, fetched):
                arrays[i] = array
        return _nest.map_output(lambda x: arrays[x.index] if isinstance(x, _Leaf) else x, indexed)

    def name_scope(self, scope: str) -> contextlib.AbstractContextManager[Any]:
        """See base class: `torch.profiler.record_function`, only while a profiler records."""
        if torch.compiler.is_compiling() or not torch.autograd.profiler._is_profiler_enabled:
            return NULL_SCOPE
        return torch.profiler.record_function(scope.rstrip("/"))

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> Loop:
        """See base class and the module docstring.

        `compile_step` compiles the step with `torch.compile`; False runs it eagerly
        (same lifting, data movement, NaN check and single sync). `compile_loop` has
        no separate meaning: a stateful torch step (optimizers, in-place updates) has
        no in-graph loop, so every loop is a Python loop over the (compiled) step,
        without host syncs between steps; with `mode="reduce-overhead"` on CUDA each
        step is one CUDA-graph replay.
        """
        if not callable(step_fn):
            raise ProtocolError(f"`step_fn` must be callable; received {value_repr(step_fn)}.")
        parsed = parse_backend_options(options.backend_options)
        return TorchLoop(step_fn, module, options.compile_step, parsed)

    def array_namespace(self) -> Any:
        """See `looproto.backends.torch.array_namespace`."""
        return array_namespace()

    # The gradient helpers, also as methods (`backends.get("torch").value_and_grad`).
    def value_and_grad(
        self, fn: Callable[[], Any], module: Any, has_aux: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """See `looproto.backends.torch.value_and_grad`."""
        return value_and_grad(fn, module, has_aux=has_aux)

    def grad(self, fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
        """See `looproto.backends.torch.grad`."""
        return grad(fn, module, has_aux=has_aux)

    def initialize_distributed(self, timeout: float = distributed.DEFAULT_TIMEOUT) -> TorchEngine:
        """See `looproto.backends.torch.initialize_distributed`."""
        return initialize_distributed(timeout)

    def hooks_gated(self) -> bool:
        """See `looproto.backends.SupportsHookGate`: while `torch.compile` traces.

        Dynamo cannot trace other frameworks' hook code (`tf.inside_function`, JAX's
        scopes), and what those hooks guard cannot happen there.
        """
        return torch.compiler.is_compiling()

    def iterator_state(self, obj: Any) -> StateDictAdapter | None:
        """See `looproto.backends.SupportsIteratorState`: torchdata's loaders."""
        return iterator_state(obj)

    def state_to_json(self, value: Any) -> tuple[str, Any] | None:
        """See `looproto.backends.SupportsStateJSON`: tensors."""
        return tensor_to_json(value)

    def state_from_json(self, tag: str, payload: Any) -> Any:
        """See `looproto.backends.SupportsStateJSON`."""
        return tensor_from_json(tag, payload)

    def hyperparameters(self, obj: Any) -> dict[str, float] | None:
        """See base class: a torch optimizer's param groups (or its scheduler's optimizer's)."""
        return hyperparameters(obj)

    def metric_adapter(self, obj: Any) -> ComputeMetricAdapter | None:
        """See base class: torchmetrics metrics and collections."""
        return metric_adapter(obj)

    def numpy_dtype(self, dtype: Any) -> np.dtype[Any]:
        """See `looproto.backends.SupportsDtypes`."""
        return np_dtype(dtype)


BACKEND = TorchBackend()
