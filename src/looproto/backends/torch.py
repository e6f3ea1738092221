"""The PyTorch backend: a `torch.compile`d step, state kept on device, one host sync per loop.

Users write `train_step(iterator)` as ordinary eager PyTorch: forward, `backward()`,
`optimizer.step()`. For each inner loop of `num_steps` steps the adapter

1. walks the module once: the device of its tensors (all must agree, or the
   `device` option says where), and its NumPy `looproto.Variable`s (the global
   step from `looproto.create_global_step()`, loss accumulators, ...);
2. *lifts* those NumPy Variables onto the device as tensors for the duration of
   the loop. `assign_add` inside a compiled step is then a tensor op: one graph, no
   recompiles, `fullgraph=True` works. (Left as NumPy, Dynamo traces the NumPy
   code, graph-breaks on it, changes the value's type to a 0-d `ndarray` and runs
   ~10x slower; a Python `int` counter recompiles every step until the recompile
   limit. Measured on torch 2.13; see `docs/backends/torch.md`.);
3. pulls one batch per step from the iterator on the host, moves it to the
   device (`non_blocking`), and hands it to the step through a tiny iterator,
   so Dynamo never traces the data pipeline;
4. calls the step compiled once with `torch.compile` (cached; `mode`,
   `fullgraph`, `dynamic` and `backend` are options), or eagerly. Outputs stay on
   device; with `nan_check` a few fused device ops per step record the first
   step whose outputs were not finite. Nothing is read back per step;
5. at the end, fetches the lifted Variables and the NaN record in *one*
   device-to-host transfer and writes the Variables back as NumPy, so
   `train_loop_end`, summaries, the Controller and checkpoints see host values.

Discovery: a `torch.nn.Module` held by a `looproto.Module` contributes its
parameters (`torch.nn.Parameter`, trainable when `requires_grad`) and persistent
buffers under their `named_parameters()` paths split on "."; a
`DistributedDataParallel`/`DataParallel` or `torch.compile` wrapper is
unwrapped so paths do not change. A `torch.optim.Optimizer` contributes the
numeric entries of its param groups (`lr`, `betas`, ...) and its per-parameter
state keyed by the parameter's name (when built from `named_parameters()`) or
its position, plus a `has_state` flag per parameter. A learning-rate scheduler
contributes the numeric entries of its `state_dict()`, a `torch.Generator` its
state. Plain tensor attributes are not state (as on an `nn.Module`). Optimizer state is
created lazily by the first `step()`; so that a fresh optimizer can be restored
into, its not-yet-existing state is shown as *pending* entries (shapes found by
one step of a throwaway copy) that a checkpoint restore creates, and that stay
absent when the checkpoint says `has_state=False`.

`value_and_grad(fn, module)` returns `fn()`'s gradients keyed by variable path,
like `looproto.backends.jax.value_and_grad`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

try:  # Imported with the backend: inside `torch.compile`d code an import could break the graph.
    import array_api_compat.torch as _array_api
except ImportError:  # pragma: no cover - array-api-compat is in looproto's `portable` extra
    _array_api = None  # type: ignore[assignment]

from looproto import _nest, distributed
from looproto.backends._feed import NO_DATA, StepIterator, is_iterator_container
from looproto.backends.base import Loop, LoopOptions, ReduceFn, StepFn
from looproto.errors import (
    BackendNotAvailableError,
    ConfigError,
    DistributedError,
    LooprotoError,
    ProtocolError,
    ShapeError,
    value_repr,
)
from looproto.module import Module as ModuleBase
from looproto.module import (
    NameScope,
    Variable,
    backend_for_variable,
    register_hook_gate,
    register_name_scope_hook,
    variables_by_path,
)

if TYPE_CHECKING:
    from looproto.module import Module

__all__ = [
    "BACKEND",
    "BACKEND_OPTIONS",
    "NonFiniteError",
    "TorchBackend",
    "TorchEngine",
    "array_namespace",
    "data_parallel",
    "grad",
    "initialize_distributed",
    "process_group_size",
    "value_and_grad",
]

_log = logging.getLogger("looproto")

BACKEND_OPTIONS: dict[str, str] = {
    "mode": 'the `torch.compile` mode: None (default), "default", "reduce-overhead" '
    '(CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs"',
    "fullgraph": "compile the step as one graph; a graph break raises `ProtocolError` "
    "(default False)",
    "dynamic": "`torch.compile`'s `dynamic`: None (default: automatic), True or False",
    "backend": 'the `torch.compile` backend (default "inductor"; "openxla" on XLA '
    'devices; "eager"/"aot_eager" to debug)',
    "device": "where batches and lifted variables go (default: the device of the "
    'module\'s tensors, else "cpu")',
    "nan_check": "raise `NonFiniteError` naming the first step whose outputs were not "
    "finite, checked on device, read once per loop (default False)",
    "trace_autograd": "let Dynamo trace `backward()`/`torch.autograd.grad` into the graph "
    "(`torch._dynamo.config.trace_autograd_ops`; default False)",
}
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class NonFiniteError(LooprotoError, FloatingPointError):
    """A step's outputs became NaN or infinite (raised with `nan_check`)."""


# ----------------------------------------------------------------------------
# Small helpers.

_tls = threading.local()  # `.shallow`: walks that need no optimizer pending state.
_NULL_SCOPE = contextlib.nullcontext()


@contextlib.contextmanager
def _shallow_walk(tensors_only: bool = False) -> Iterator[None]:
    """Walks inside skip the (costly) pending optimizer state: only the backend's own walks.

    With `tensors_only`, `nn.Module`s yield their raw tensors without paths (the
    loop's walk, once per loop, only needs their devices).
    """
    previous = getattr(_tls, "shallow", False), getattr(_tls, "tensors_only", False)
    _tls.shallow, _tls.tensors_only = True, tensors_only
    try:
        yield
    finally:
        _tls.shallow, _tls.tensors_only = previous


def _own_tensors(module: torch.nn.Module) -> Iterator[Any]:
    yield from module._parameters.values()
    yield from module._buffers.values()


def _np_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return np.dtype(str(dtype).rpartition(".")[2])


def _tensor_of(obj: Any) -> Any:
    """The tensor behind a Parameter, a view or a `looproto.Variable` (else `obj`)."""
    return obj.value if isinstance(obj, Variable) else obj


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/DataParallel and `torch.compile` wrappers (paths stay put)."""
    inner: Any = module
    while True:
        if isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = inner.module
        elif type(inner).__name__ == "OptimizedModule" and hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        else:
            result: torch.nn.Module = inner
            return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _numeric(value: Any) -> bool:
    """Storable hyper-parameters: numbers, tensors, and non-empty lists/tuples of numbers."""
    if _is_number(value) or isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(map(_is_number, value))


def _from_python(value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, torch.Tensor):
        return _to_numpy_tensor(value)
    array = np.asarray(value)
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    return array.astype(np.float64)


def _like_python(template: Any, array: np.ndarray[Any, Any]) -> Any:
    """`array` in the Python form of `template` (a number, a list or tuple of them)."""
    if isinstance(template, (list, tuple)):
        items = [_like_python(t, a) for t, a in zip(template, np.asarray(array).reshape(-1))]
        return type(template)(items)
    return type(template)(np.asarray(array).item())


def _to_numpy_tensor(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A host copy (a CPU tensor's `.numpy()` alone would share its memory)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16.
        tensor = tensor.float()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    array: np.ndarray[Any, Any] = np.array(tensor.numpy(), copy=True)
    return array


def _write_tensor(tensor: torch.Tensor, array: np.ndarray[Any, Any], name: str) -> None:
    """Copies `array` into `tensor` in place (device and dtype kept; same-kind casts only)."""
    array = np.asarray(array)
    if tuple(tensor.shape) != tuple(array.shape):
        raise ShapeError(
            f"Cannot assign an array of shape {array.shape} to {name!r} of shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.dtype != torch.bfloat16:
        target = _np_dtype(tensor.dtype)
        if array.dtype != target and not np.can_cast(array.dtype, target, casting="same_kind"):
            raise ShapeError(
                f"Cannot assign an array of dtype {array.dtype} to {name!r} of dtype {target}."
            )
    source = torch.from_numpy(np.array(array, copy=True))
    with torch.no_grad():
        tensor.copy_(source)


def _fill_tensor(tensor: torch.Tensor, number: Any, name: str) -> None:
    """`tensor.fill_(number)`, refusing what NumPy would refuse (no NumPy: traceable)."""
    if isinstance(number, np.generic):
        number = number.item()
    if tensor.dim() != 0:
        raise ShapeError(
            f"Cannot assign the number {number!r} to {name!r} of shape {tuple(tensor.shape)}: "
            "the shape of a variable is fixed when it is created."
        )
    lossy = (isinstance(number, complex) and not tensor.is_complex()) or (
        isinstance(number, float) and not (tensor.is_floating_point() or tensor.is_complex())
    )
    if lossy or (tensor.dtype == torch.bool and not isinstance(number, bool)):
        raise ShapeError(
            f"Cannot assign {number!r} to {name!r} of dtype {tensor.dtype}: expected a value "
            "of that dtype."
        )
    with torch.no_grad():
        tensor.fill_(number)


# ----------------------------------------------------------------------------
# Views: looproto Variables standing for state that torch keeps in its own containers.


class _View(Variable):
    """A `looproto.Variable` whose value lives elsewhere (a buffer, optimizer state)."""

    __slots__ = ()

    def __init__(self, name: str) -> None:  # Variable.__init__ would store a value.
        self._name = f"{name}:0"
        self._trainable = False

    def _get(self) -> Any:
        raise NotImplementedError

    def _write(self, value: Any) -> None:
        raise NotImplementedError

    @property
    def _value(self) -> Any:
        return self._get()

    @_value.setter
    def _value(self, value: Any) -> None:
        self._write(value)

    @property
    def dtype(self) -> np.dtype[Any]:
        """See `looproto.Variable.dtype`."""
        value = self._get()
        return (
            _np_dtype(value.dtype) if isinstance(value, torch.Tensor) else np.asarray(value).dtype
        )


class _BufferView(_View):
    """A persistent buffer of an `nn.Module`, looked up by name on every access."""

    __slots__ = ("_buffer", "_owner")

    def __init__(self, owner: torch.nn.Module, buffer: str, name: str) -> None:
        super().__init__(name)
        self._owner = owner
        self._buffer = buffer

    def _get(self) -> Any:
        return self._owner._buffers[self._buffer]

    def _write(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                self._get().copy_(value)
        else:
            _write_tensor(self._get(), value, self._name)


class _ParamState:
    """One parameter's optimizer state, as a restore assigns it (pending until complete)."""

    __slots__ = ("_flag", "_keys", "_optimizer", "_param", "_received", "_staged", "templates")

    def __init__(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, templates: dict[str, Any]
    ) -> None:
        self._optimizer = optimizer
        self._param = param
        self.templates = templates  # key -> value to show while the state does not exist
        self._keys = frozenset(templates) | {None}  # None: the has_state flag
        self._received: set[str | None] = set()
        self._staged: dict[str, Any] = {}
        self._flag: bool | None = None

    def live(self) -> dict[Any, Any] | None:
        state = self._optimizer.state.get(self._param)
        return state if state else None

    def get(self, key: str) -> Any:
        live = self.live()
        return live[key] if live is not None and key in live else self.templates[key]

    def receive(self, key: str | None, value: Any) -> None:
        live = self.live()
        if key is None:
            self._flag = bool(np.asarray(value))
        elif live is not None and key in live:
            current = live[key]
            if isinstance(current, torch.Tensor):
                _write_tensor(current, np.asarray(value), key)
            else:
                live[key] = _like_python(current, np.asarray(value))
        else:
            template = self.templates[key]
            if isinstance(template, torch.Tensor):
                staged = torch.empty_like(template)
                _write_tensor(staged, np.asarray(value), key)
                self._staged[key] = staged
            else:
                self._staged[key] = _like_python(template, np.asarray(value))
        self._received.add(key)
        if self._received >= self._keys:
            self._commit()

    def _commit(self) -> None:
        # A checkpoint of a parameter that had no state yet restores to no state, so the
        # next step initialises it exactly as a fresh optimizer would.
        if self._flag:
            if self._staged:
                self._optimizer.state[self._param].update(self._staged)
        else:
            self._optimizer.state.pop(self._param, None)
        self._received.clear()
        self._staged.clear()


class _SlotView(_View):
    __slots__ = ("_key", "_record")

    def __init__(self, record: _ParamState, key: str, name: str) -> None:
        super().__init__(name)
        self._record = record
        self._key = key

    def _get(self) -> Any:
        value = self._record.get(self._key)
        return value if isinstance(value, torch.Tensor) else _from_python(value)[()]

    def _write(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = _to_numpy_tensor(value)
        self._record.receive(self._key, value)


class _FlagView(_View):
    __slots__ = ("_record",)

    def __init__(self, record: _ParamState, name: str) -> None:
        super().__init__(name)
        self._record = record

    def _get(self) -> Any:
        return np.bool_(self._record.live() is not None)

    def _write(self, value: Any) -> None:
        self._record.receive(None, value)


class _EntryView(_View):
    """A numeric entry of a dict (a param group) or attribute of an object (a scheduler)."""

    __slots__ = ("_key", "_target")

    def __init__(self, target: Any, key: str, name: str) -> None:
        super().__init__(name)
        self._target = target
        self._key = key

    def _read(self) -> Any:
        if isinstance(self._target, dict):
            return self._target[self._key]
        return getattr(self._target, self._key)

    def _get(self) -> Any:
        value = self._read()
        if isinstance(value, torch.Tensor):
            return value
        array = _from_python(value)
        return array[()] if array.ndim == 0 else array

    def _write(self, value: Any) -> None:
        current = self._read()
        if isinstance(current, torch.Tensor):
            _write_tensor(current, np.asarray(value), self._name)
            return
        new = _like_python(current, np.asarray(value))
        if isinstance(self._target, dict):
            self._target[self._key] = new
        else:
            setattr(self._target, self._key, new)


class _GeneratorView(_View):
    """A `torch.Generator`'s state (a uint8 tensor), so random streams resume exactly."""

    __slots__ = ("_generator",)

    def __init__(self, generator: torch.Generator, name: str) -> None:
        super().__init__(name)
        self._generator = generator

    def _get(self) -> Any:
        return self._generator.get_state()

    def _write(self, value: Any) -> None:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
        self._generator.set_state(torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)))


# ----------------------------------------------------------------------------
# Discovery of torch containers.

_Pairs = list[tuple[tuple[Any, ...], Any]]


def _module_pairs(module: torch.nn.Module) -> _Pairs:
    module = _unwrap(module)
    pairs: _Pairs = [(tuple(n.split(".")), p) for n, p in module.named_parameters()]
    for prefix, sub in module.named_modules():
        for buffer, value in sub._buffers.items():
            if value is None or buffer in sub._non_persistent_buffers_set:
                continue  # Like `state_dict()`: derived buffers are not state.
            name = f"{prefix}.{buffer}" if prefix else buffer
            pairs.append((tuple(name.split(".")), _BufferView(sub, buffer, name.replace(".", "/"))))
    return pairs


# Optimizer -> (signature, {param id: {key: template}}) of state not created yet.
_pending_cache: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, dict[int, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _pending_templates(
    optimizer: torch.optim.Optimizer, missing: list[torch.Tensor]
) -> dict[int, dict[str, Any]]:
    """The state `optimizer.step()` would create for `missing`, from a throwaway copy.

    The copy has the optimizer's class, hyper-parameters and private attributes, but
    zero-filled clones of the parameters (with zero gradients), its own state and no
    hooks; its class's `step` runs once. The live optimizer is not touched.
    """
    signature = (
        tuple((id(p), tuple(p.shape), p.dtype, p.device) for p in missing),
        repr([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]),
    )
    cached = _pending_cache.get(optimizer)
    if cached is not None and cached[0] == signature:
        return cached[1]
    wanted = {id(p) for p in missing}
    clones: dict[int, torch.Tensor] = {}
    throwaway = object.__new__(type(optimizer))
    attrs = vars(optimizer)
    skip = {"step", "state", "param_groups"}  # `step`: a scheduler's wrapper of the live one
    throwaway.__dict__.update({k: v for k, v in attrs.items() if k not in skip})
    for key, value in attrs.items():
        if key.endswith("_hooks") and isinstance(value, dict):
            throwaway.__dict__[key] = collections.OrderedDict()
    throwaway.state = collections.defaultdict(dict)
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) in wanted:
                clone = torch.zeros_like(p, memory_format=torch.preserve_format)
                clone.requires_grad_(True)
                clone.grad = torch.zeros_like(p)
                clones[id(p)] = clone
                params.append(clone)
        groups.append({**group, "params": params})
    throwaway.param_groups = groups
    templates: dict[int, dict[str, Any]] = {}
    try:
        with torch.no_grad():
            type(optimizer).step(throwaway)
    except Exception as err:  # An optimizer that needs a closure, sparse grads, ...
        _log.warning(
            "Could not find the state shapes of %s by a trial step (%s: %s); a checkpoint "
            "holding its state cannot be restored before its first step.",
            type(optimizer).__name__,
            type(err).__name__,
            err,
        )
    else:
        for pid, clone in clones.items():
            state = throwaway.state.get(clone, {})
            templates[pid] = {
                k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v)
                for k, v in state.items()
                if _numeric(v)
            }
    _pending_cache[optimizer] = (signature, templates)
    return templates


def _optimizer_pairs(optimizer: torch.optim.Optimizer, name: str) -> _Pairs:
    pairs: _Pairs = []
    for index, group in enumerate(optimizer.param_groups):
        for key in sorted(group):
            if key not in ("params", "param_names") and _numeric(group[key]):
                path = ("param_groups", index, key)
                pairs.append((path, _EntryView(group, key, f"{name}/param_groups/{index}/{key}")))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names: list[str] | None = [n for g in optimizer.param_groups for n in g.get("param_names", ())]
    if names is not None and len(names) != len(params):
        names = None
    missing = [p for p in params if p.requires_grad and not optimizer.state.get(p)]
    templates = _pending_templates(optimizer, missing) if missing else {}
    for index, param in enumerate(params):
        state = optimizer.state.get(param)
        if not state and not param.requires_grad:
            continue  # Never gets state.
        label = tuple(names[index].split(".")) if names else (index,)
        if state:
            shown = {k: v for k, v in state.items() if _numeric(v)}
        else:
            shown = templates.get(id(param), {})
        record = _ParamState(optimizer, param, shown)
        base = "/".join(map(str, (name, "state", *label)))
        for key in sorted(shown):
            pairs.append((("state", *label, key), _SlotView(record, key, f"{base}/{key}")))
        pairs.append((("state", *label, "has_state"), _FlagView(record, f"{base}/has_state")))
    return pairs


def _scheduler_pairs(scheduler: Any, name: str) -> _Pairs:
    pairs: _Pairs = []
    for key, value in sorted(scheduler.state_dict().items()):
        if _numeric(value) and hasattr(scheduler, key):
            short = key.lstrip("_")
            pairs.append(((short,), _EntryView(scheduler, key, f"{name}/{short}")))
    return pairs


# ----------------------------------------------------------------------------
# Gradients over a Module.


def _grad_targets(module: Any) -> list[tuple[str, Any]]:
    """`(path, Parameter or tensor-holding Variable)` for each trainable float tensor."""
    from looproto.module import is_trainable

    targets: list[tuple[str, Any]] = []
    with _shallow_walk():
        found = variables_by_path(module, predicate=is_trainable)
    for path, variable in found.items():
        tensor = _tensor_of(variable)
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
    if has_aux:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ProtocolError(
                f"With `has_aux=True`, `fn` must return `(loss, aux)`; received {value_repr(out)}."
            )
        loss, aux = out
    else:
        loss, aux = out, None
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


# ----------------------------------------------------------------------------
# Devices: moving data, one transfer back, torch_xla.


def _xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


class _DeviceOps:
    """What differs between devices: per-step sync, and fetching many tensors at once."""

    cudagraph_steps = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def after_step(self) -> None:
        """Nothing: CUDA and CPU queue work asynchronously."""

    def fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray[Any, Any]]:
        """Host copies of `tensors` in one device-to-host transfer.

        The tensors are viewed as bytes and concatenated on device (widest dtype
        first, so every slice stays aligned), copied once, and split on the host.
        """
        if not tensors:
            return []
        if len(tensors) == 1:
            return [_to_numpy_tensor(tensors[0])]
        prepared = [
            t.detach().float() if t.dtype == torch.bfloat16 else t.detach() for t in tensors
        ]
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i].element_size())
        parts = [prepared[i].reshape(-1).view(torch.uint8) for i in order]
        on_device = torch.cat(parts)
        packed = (on_device if on_device.device.type == "cpu" else on_device.cpu()).numpy()
        out: list[np.ndarray[Any, Any]] = [np.empty(0)] * len(prepared)
        offset = 0
        for i, part in zip(order, parts):
            size = part.numel()
            t = prepared[i]
            chunk = packed[offset : offset + size]
            out[i] = chunk.view(_np_dtype(t.dtype)).reshape(t.shape).copy()
            offset += size
        return out


class _XlaOps(_DeviceOps):
    """torch_xla: cut the lazy graph after every step; one execution fetches everything."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
        except ImportError as err:
            raise BackendNotAvailableError(
                f"`device` {str(device)!r} is an XLA device, which needs torch_xla "
                f"({err}). Install a torch_xla matching torch {torch.__version__}."
            ) from err
        self._sync: Callable[[], Any] = getattr(torch_xla, "sync", None) or xm.mark_step
        self._get_cpu = getattr(torch_xla._XLAC, "_xla_get_cpu_tensors", None)

    def after_step(self) -> None:
        self._sync()

    def fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray[Any, Any]]:
        if not tensors:
            return []
        self._sync()
        if self._get_cpu is None:  # pragma: no cover - older/newer torch_xla
            return [_to_numpy_tensor(t) for t in tensors]
        return [np.array(t.numpy(), copy=True) for t in self._get_cpu(list(tensors))]


class _CudaOps(_DeviceOps):
    pass


def _device_ops(device: torch.device, mode: str | None) -> _DeviceOps:
    if device.type == "xla":
        return _XlaOps(device)
    if device.type == "cuda":
        ops = _CudaOps(device)
        ops.cudagraph_steps = mode == "reduce-overhead"
        return ops
    return _DeviceOps(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`"cuda"` and `"cuda:0"` are the same device when 0 is the current one."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every array and tensor on `device` (NumPy arrays become tensors)."""
    kind = type(batch)
    if kind is torch.Tensor:  # The common cases first: this runs every step.
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if kind is tuple or kind is list:
        return kind([_to_device(v, device) for v in batch])
    if kind is dict:
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind in "OUSV":
            return batch
        if not batch.flags.writeable:
            batch = batch.copy()  # torch warns on read-only memory.
        tensor = torch.from_numpy(batch)
        return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------
# The inner loop.

_TWICE_HINT = (
    "The torch loop pulls exactly one batch per step before the step runs (so the data "
    "pipeline stays out of the compiled graph); batch larger in the dataset."
)


def _step_iterators(iterator: Any, step_name: str) -> tuple[Any, list[tuple[Any, StepIterator]]]:
    """A structure like `iterator` with `StepIterator` leaves, and `(source, leaf)` pairs."""
    pairs: list[tuple[Any, StepIterator]] = []

    def build(it: Any) -> Any:
        if isinstance(it, Mapping):
            return {k: build(v) for k, v in it.items()}
        if is_iterator_container(it):
            return type(it)(build(v) for v in it)
        leaf = StepIterator(step_name, _TWICE_HINT)
        pairs.append((it, leaf))
        return leaf

    if iterator is None:
        return StepIterator(step_name, _TWICE_HINT), []
    return build(iterator), pairs


class _Watch:
    """On-device record of the first step whose float outputs were not all finite.

    Made once per loop object and reset in place, so the compiled step sees the
    same tensors every time (no new guards; CUDA graphs may mutate them in place).
    """

    def __init__(self, device: torch.device, static: bool) -> None:
        self.device = device
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.mask = torch.zeros((), dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        if static:
            for t in (self.first_bad, self.mask, self.counter):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.first_bad.fill_(-1)
        self.mask.zero_()
        self.counter.zero_()

    def update(self, outputs: Any) -> None:
        leaves = [t for _, t in _float_leaves(outputs)]
        with torch.no_grad():
            if leaves:
                finite = torch.stack([torch.isfinite(t).all() for t in leaves[:63]])
                bits = torch.tensor([1 << i for i in range(len(finite))], device=finite.device)
                bad = ((~finite).long() * bits).sum()
                new = (self.first_bad < 0) & (bad != 0)
                self.first_bad.copy_(torch.where(new, self.counter, self.first_bad))
                self.mask.copy_(torch.where(new, bad, self.mask))
            self.counter.add_(1)


def _float_leaves(outputs: Any, path: tuple[Any, ...] = ()) -> list[tuple[str, torch.Tensor]]:
    if isinstance(outputs, Mapping):
        return [leaf for k in outputs for leaf in _float_leaves(outputs[k], (*path, k))]
    if isinstance(outputs, (list, tuple)):
        return [leaf for i, v in enumerate(outputs) for leaf in _float_leaves(v, (*path, i))]
    if isinstance(outputs, torch.Tensor) and (outputs.is_floating_point() or outputs.is_complex()):
        return [("/".join(map(str, path)) or "<output>", outputs)]
    return []


class _Lifted:
    """NumPy `looproto.Variable`s bound to device tensors while the loop runs."""

    def __init__(self, variables: list[Variable], device: torch.device) -> None:
        self.variables = variables
        self.originals = [v._value for v in variables]
        for variable, value in zip(variables, self.originals):
            tensor = torch.from_numpy(np.array(value, copy=True))
            variable._value = (
                tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
            )

    def restore(self) -> None:
        """Puts the NumPy values from before the loop back (nothing ran)."""
        for variable, original in zip(self.variables, self.originals):
            variable._value = original

    def write_back(self, arrays: list[np.ndarray[Any, Any]]) -> None:
        """Stores the fetched values, in each Variable's NumPy dtype and kind."""
        for variable, original, array in zip(self.variables, self.originals, arrays):
            value = array.astype(original.dtype, copy=False)
            variable._value = value[()] if isinstance(original, np.generic) else value


def _is_state(obj: Any) -> bool:
    return isinstance(obj, (Variable, torch.Tensor))


class _TorchLoop:
    """See the module docstring. Built once per trainer; compiles on the first call."""

    def __init__(self, step_fn: StepFn, module: Any, compile_step: bool, opts: dict[str, Any]):
        self._step_fn = step_fn
        self._module = module
        self._compile_step = compile_step
        self._opts = opts
        owner = getattr(step_fn, "__self__", None)
        name = getattr(step_fn, "__name__", type(step_fn).__name__)
        self._step_name = f"{type(owner).__name__}.{name}" if owner is not None else name
        self._device: torch.device | None = None
        self._ops: _DeviceOps = _DeviceOps(torch.device("cpu"))
        self._call: Callable[[Any], Any] = step_fn
        self._watch: _Watch | None = None
        self._output_names: list[str] | None = None

    # -- building -----------------------------------------------------------

    def _walk(self) -> tuple[torch.device, list[Variable]]:
        """The loop's device and the NumPy Variables to lift (one walk per loop)."""
        devices: set[torch.device] = set()
        lift: list[Variable] = []
        with _shallow_walk(tensors_only=True):
            # Leaves only (no path strings): paths are worked out only for an error.
            found = (
                self._module._flatten(predicate=_is_state)
                if isinstance(self._module, ModuleBase)
                else variables_by_path(self._module, predicate=_is_state).values()
            )
            for variable in found:
                value = _tensor_of(variable)
                if isinstance(value, torch.Tensor):
                    devices.add(value.device)
                elif (
                    type(variable) is Variable
                    and isinstance(value, (np.ndarray, np.generic))
                    and value.dtype.kind in "biufc"
                ):
                    lift.append(variable)
        wanted = self._opts["device"]
        if len(devices) > 1:
            raise ConfigError(
                f"The tensors of `{self._step_name}`'s module are on several devices: "
                f"{self._device_listing()}. Move the model to one device (`model.to(device)`) "
                "before building the optimizer."
            )
        if not devices:
            return wanted or torch.device("cpu"), lift
        (device,) = devices
        if wanted is not None and not _same_device(wanted, device):
            raise ConfigError(
                f'`backend_options["device"]` is {str(wanted)!r} but the module\'s tensors '
                f"are on {self._device_listing()}. Move the model there first."
            )
        return device, lift

    def _device_listing(self) -> str:
        first: dict[torch.device, str] = {}
        with _shallow_walk():
            for path, variable in variables_by_path(self._module).items():
                value = _tensor_of(variable)
                if isinstance(value, torch.Tensor):
                    first.setdefault(value.device, path)
        return ", ".join(f"{str(d)!r} (e.g. {p!r})" for d, p in first.items())

    def _build(self, device: torch.device) -> None:
        """Device ops, the NaN watch and the (compiled) step for `device`; once per device."""
        opts = self._opts
        # Warm looproto's type -> backend cache for tensors here: filling it inside a
        # compiled step (`Variable.assign(0)` asks it) would be a graph break.
        backend_for_variable(torch.zeros(()))
        self._device = device
        self._ops = _device_ops(device, opts["mode"])
        step_fn = self._step_fn
        step: Callable[[Any], Any] = step_fn
        if opts["nan_check"]:
            watch = self._watch = _Watch(device, self._ops.cudagraph_steps)

            def step(step_iterator: Any) -> Any:
                outputs = step_fn(step_iterator)
                watch.update(outputs)  # Traced into the step's last graph: a few fused ops.
                return outputs

        if self._compile_step:
            backend = opts["backend"] or ("openxla" if device.type == "xla" else "inductor")
            step = torch.compile(
                step,
                mode=opts["mode"],
                fullgraph=opts["fullgraph"],
                dynamic=opts["dynamic"],
                backend=backend,
            )
        self._call = step

    # -- running --------------------------------------------------------------

    def __call__(
        self,
        iterator: Any,
        num_steps: int,
        state: Any = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Any, int]:
        with NameScope(""):
            pass  # Hooks up framework scopes now, not inside compiled code (a graph break).
        device, to_lift = self._walk()
        if device != self._device:
            self._build(device)
        ops, call, watch = self._ops, self._call, self._watch
        start_step = _global_step(self._module)
        structure, sources = _step_iterators(iterator, self._step_name)
        if watch is not None:
            watch.reset()
        lifted = _Lifted(to_lift, device)
        patch = (
            torch._dynamo.config.patch(trace_autograd_ops=True)
            if self._compile_step and self._opts["trace_autograd"]
            else _NULL_SCOPE
        )
        steps, ok = 0, False
        try:
            with patch:
                while num_steps < 0 or steps < num_steps:
                    try:
                        for source, leaf in sources:
                            leaf.feed(_to_device(next(source), device))
                    except StopIteration:
                        _log.debug("The data iterator is exhausted after %d steps.", steps)
                        break
                    if ops.cudagraph_steps:
                        torch.compiler.cudagraph_mark_step_begin()
                    outputs = call(structure)
                    ops.after_step()
                    if watch is not None and self._output_names is None:
                        self._check_outputs(outputs)
                    if reduce_fn is not None:
                        state = reduce_fn(state, outputs)
                    steps += 1
            ok = True
        except torch._dynamo.exc.Unsupported as err:
            if not self._opts["fullgraph"]:
                raise
            raise ProtocolError(_graph_break_message(self._step_name, err)) from None
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            limit = torch._dynamo.config.recompile_limit
            raise ProtocolError(
                f"`{self._step_name}` was recompiled on every call until torch's recompile "
                f"limit (`torch._dynamo.config.recompile_limit` = {limit}): something it reads "
                "changes from step to step (a Python value on the trainer, say). Keep such "
                "state in a `looproto.Variable` or a tensor."
            ) from None
        except Exception as err:
            if _is_peer_failure(err):
                where = f"a collective operation in `{self._step_name}` (DDP's all-reduce)"
                raise distributed.peer_failure(err, where) from err
            raise
        finally:
            for _, leaf in sources:
                leaf.feed(NO_DATA)  # Do not keep the last batch alive on device.
            record = self._finish(ops, lifted, watch, ok, steps)
        if record is not None:
            self._raise_non_finite(record, steps, start_step)
        return state, steps

    def _check_outputs(self, outputs: Any) -> None:
        self._output_names = [name for name, _ in _float_leaves(outputs)]
        if not self._output_names:
            self._output_names = None
            raise ProtocolError(
                f'`backend_options["nan_check"]` checks the floating-point tensors '
                f"`{self._step_name}` returns, but it returned {value_repr(outputs)}. "
                "Return the loss (e.g. `{'loss': loss}`)."
            )

    def _finish(
        self, ops: _DeviceOps, lifted: _Lifted, watch: _Watch | None, ok: bool, steps: int
    ) -> tuple[int, int] | None:
        """The loop's one host sync: lifted Variables and the NaN record, fetched together.

        Every lifted Variable is fetched: steps may have changed a tensor in place
        (`var.value.add_(x)`, or assigning a Python number), not only replaced it.
        """
        if not steps:
            lifted.restore()
            return None
        tensors = [variable._value for variable in lifted.variables]
        bad = [v.name for v, t in zip(lifted.variables, tensors) if not isinstance(t, torch.Tensor)]
        if bad:
            lifted.restore()
            if not ok:
                return None
            raise ProtocolError(
                f"`{self._step_name}` stored non-tensor values in {bad}; inside the torch "
                "loop these Variables hold tensors (assign tensors or numbers to them)."
            )
        if watch is not None and ok:
            tensors += [watch.first_bad, watch.mask]
        try:
            arrays = ops.fetch(tensors)
        except Exception:
            lifted.restore()
            if ok:
                raise
            return None  # Keep the step's own error; the updates are lost.
        lifted.write_back(arrays)
        if watch is None or not ok:
            return None
        first_bad, mask = int(arrays[-2]), int(arrays[-1])
        return (first_bad, mask) if first_bad >= 0 else None

    def _raise_non_finite(self, record: tuple[int, int], steps: int, start: int | None) -> None:
        first_bad, mask = record
        names = self._output_names or []
        bad = [n for i, n in enumerate(names[:63]) if mask >> i & 1]
        where = f" (the loop started at global step {start})" if start is not None else ""
        raise NonFiniteError(
            f"`{self._step_name}` returned non-finite values (NaN or inf) in {bad} at step "
            f"{first_bad + 1} of this {steps}-step loop{where}. The loop ran to its end, so "
            "the variables hold the values after its last step; restore a checkpoint to go "
            "back."
        )


def _global_step(module: Any) -> int | None:
    step = getattr(module, "global_step", None)
    if isinstance(step, Variable) and isinstance(step._value, (np.ndarray, np.generic)):
        return int(step._value)
    return None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's run to dozens of lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _graph_break_message(step_name: str, err: BaseException) -> str:
    text = str(err)
    frames = [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]
    # Dynamo lists the frames outermost first; leave out looproto's own.
    user = [f for f in frames if __file__ not in f]
    where = ""
    if user:
        where = f" ({user[0]}" + (f"; inside {user[-1]}" if len(user) > 1 else "") + ")"
    hints = []
    if "backward" in text or "autograd" in text:
        hints.append(
            "`backward()` and `torch.autograd.grad` are traced only with "
            '`backend_options={"trace_autograd": True}`.'
        )
    if "optim" in text and ("graph_break()" in text or "marked as skipped" in text):
        hints.append(
            "`torch.optim` optimizers always break the graph around `step()` and "
            "`zero_grad()` (by design); update the parameters with tensor ops instead."
        )
    hints.append("Set `fullgraph=False` to allow graph breaks.")
    return (
        f"`{step_name}` cannot be compiled as one graph (`fullgraph=True`): "
        f"{first_line(err)}{where}. " + " ".join(hints)
    )


# ----------------------------------------------------------------------------
# Multi-process: torch.distributed.

# What gloo and NCCL say when a peer process is gone or silent. Gloo raises plain
# `RuntimeError`s, so the text is all there is to tell them from a bug in the step.
_PEER_FAILURE_MARKERS = (
    "gloo",
    "NCCL",
    "Connection reset by peer",
    "Connection closed by peer",
    "Timed out waiting",
    "Broken pipe",
)


def process_group_size() -> int:
    """How many processes the default `torch.distributed` group has (1 without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def _is_peer_failure(err: BaseException) -> bool:
    if isinstance(err, LooprotoError) or not isinstance(err, RuntimeError):
        return False
    if process_group_size() < 2:
        return False
    if isinstance(err, torch.distributed.DistError):
        return True
    return any(marker in str(err) for marker in _PEER_FAILURE_MARKERS)


class TorchEngine:
    """`looproto.distributed.Engine` on `torch.distributed` (see `initialize_distributed`).

    Control messages go through the process group's `TCPStore` (the one `torchrun`
    or `init_process_group` made), with the run's timeout; orbax does not see the
    processes, so the chief writes checkpoints (`collective_checkpoints` is False).
    """

    backend = "torch"
    collective_checkpoints = False

    def __init__(self, timeout: float, owns_group: bool) -> None:
        dist = torch.distributed
        self.process_index = int(dist.get_rank())
        self.process_count = int(dist.get_world_size())
        self.timeout = timeout
        self._owns_group = owns_group
        # `torchrun` restarts keep its store: keys of an earlier attempt must not count.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.distributed_c10d._get_default_store()
        self._store = dist.PrefixStore(f"looproto/{attempt}/", store)  # type: ignore[attr-defined]

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._store.set(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        self._store.set_timeout(datetime.timedelta(seconds=timeout))
        return bytes(self._store.get(key)).decode()

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._store.delete_key(key)

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """See `looproto.distributed.Engine`: nothing to enter."""
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: destroys the process group looproto made."""
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __repr__(self) -> str:
        return f"TorchEngine(process {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> TorchEngine:
    """Joins (or adopts) the `torch.distributed` process group, for `distributed.initialize`.

    Without a process group, one is made from `torchrun`'s environment (`RANK`,
    `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `looproto train --num-processes` sets
    the same): NCCL when each local process has a GPU of its own (process
    `LOCAL_RANK` on `cuda:LOCAL_RANK`), gloo otherwise, with `timeout` for joining and
    for every collective.

    Raises:
        ConfigError: No process group and no `torchrun` environment.
        DistributedError: The other processes did not join within `timeout`.
    """
    dist = torch.distributed
    if not dist.is_available():
        raise BackendNotAvailableError(
            f"This torch ({torch.__version__}) is built without `torch.distributed`."
        )
    if dist.is_initialized():
        return TorchEngine(timeout, owns_group=False)
    env = distributed.environment("torch")
    if env is None or env.coordinator is None:
        raise ConfigError(
            "No torch process group, and `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and "
            "`MASTER_PORT` are not all set. Launch with `torchrun --nproc-per-node=N ...` or "
            "`looproto train CONFIG --num-processes N`, or call "
            "`torch.distributed.init_process_group` first."
        )
    group_backend = "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", env.process_index))
    local_count = int(os.environ.get("LOCAL_WORLD_SIZE", env.process_count))
    # NCCL needs a GPU of its own per process; with fewer GPUs than local processes
    # every process stays on gloo (and the CPU, unless the model is moved).
    if torch.cuda.is_available() and local_count <= torch.cuda.device_count():
        group_backend = "nccl"
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(group_backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"Process {env.process_index} of {env.process_count} could not join the torch "
            f"process group at {env.coordinator} within {timeout:g} s: {first_line(err)}"
        ) from err
    return TorchEngine(timeout, owns_group=True)


def data_parallel(module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """`module` in `DistributedDataParallel` when several processes train, else `module`.

    On NCCL the module first moves to this process's GPU (`device_ids` set to it).
    Checkpoint paths do not change: discovery looks through the wrapper.

    Args:
        module: The model.
        **kwargs: More `DistributedDataParallel` arguments.
    """
    if process_group_size() < 2:
        return module
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        module.to(device)
        kwargs.setdefault("device_ids", [device.index])
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


# ----------------------------------------------------------------------------
# The backend object.


def _parse_backend_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown torch `backend_options` {unknown}; expected some of "
            f"{sorted(BACKEND_OPTIONS)}."
        )
    mode = options.get("mode")
    if mode not in _MODES:
        raise ConfigError(f'`backend_options["mode"]` must be one of {_MODES}; received {mode!r}.')
    for key in ("fullgraph", "nan_check", "trace_autograd"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(
                f'`backend_options["{key}"]` must be a bool; received {options[key]!r}.'
            )
    dynamic = options.get("dynamic")
    if dynamic not in (None, True, False):
        raise ConfigError(
            f'`backend_options["dynamic"]` must be None, True or False; received {dynamic!r}.'
        )
    backend = options.get("backend")
    if backend is not None and not callable(backend):
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(
                f'`backend_options["backend"]` must be a `torch.compile` backend name or a '
                f"callable; received {backend!r}; known names: {known}."
            )
    device = options.get("device")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f'`backend_options["device"]` must name a torch device (e.g. "cpu", "cuda:0"); '
                f"received {device!r}: {first_line(err)}"
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f'`backend_options["device"]` is {str(device)!r} but CUDA is not available '
                f"to this torch ({torch.__version__})."
            )
        if device.type == "xla" and not _xla_available():
            raise BackendNotAvailableError(
                f'`backend_options["device"]` is {str(device)!r}, which needs torch_xla; '
                f"install a torch_xla matching torch {torch.__version__}."
            )
    return {
        "mode": mode,
        "fullgraph": options.get("fullgraph", False),
        "dynamic": dynamic,
        "backend": backend,
        "device": device,
        "nan_check": options.get("nan_check", False),
        "trace_autograd": options.get("trace_autograd", False),
    }


class _Leaf:
    """Marks where the `index`-th fetched tensor goes in `to_host`'s result."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class TorchBackend:
    """See the module docstring."""

    name = "torch"

    def version(self) -> str:
        """See base class."""
        return str(torch.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `torch.nn.Parameter`s (buffers and optimizer state come as views)."""
        return isinstance(obj, torch.nn.Parameter)

    def is_trainable(self, obj: Any) -> bool:
        """See base class: `requires_grad`."""
        return bool(getattr(_tensor_of(obj), "requires_grad", False))

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: `nn.Module`s, optimizers, LR schedulers, `torch.Generator`s."""
        if isinstance(obj, torch.nn.Module):
            if getattr(_tls, "tensors_only", False):  # The loop's walk: devices only.
                modules = _unwrap(obj).modules()
                return [((), t) for m in modules for t in _own_tensors(m) if t is not None]
            return _module_pairs(obj)
        if isinstance(obj, torch.optim.Optimizer):
            if getattr(_tls, "shallow", False):
                return []
            return _optimizer_pairs(obj, type(obj).__name__.lower())
        if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
            return [] if getattr(_tls, "shallow", False) else _scheduler_pairs(obj, "scheduler")
        if isinstance(obj, torch.Generator):
            return [] if getattr(_tls, "shallow", False) else [((), _GeneratorView(obj, "rng"))]
        return None

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class. Always a copy (a CPU tensor's `.numpy()` would share memory)."""
        value = _tensor_of(value)
        if isinstance(value, torch.Tensor):
            return _to_numpy_tensor(value)
        return np.array(value)

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class. In place: the tensor keeps its identity, device and dtype.

        `array` may also be a Python or NumPy number (`Variable.assign(0.0)` of a
        Variable holding a tensor comes here): written with `fill_`, traceable by
        `torch.compile`.
        """
        if isinstance(variable, _View):
            variable._write(np.asarray(array))
            return
        tensor = _tensor_of(variable)
        name = str(getattr(variable, "name", "tensor"))
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(
                f"The torch backend assigns tensors; {name!r} holds {type(tensor).__name__}."
            )
        if isinstance(array, (bool, int, float, complex, np.generic)):
            _fill_tensor(tensor, array, name)
        else:
            _write_tensor(tensor, array, name)

    def to_host(self, tree: Any) -> Any:
        """See base class: all tensors of the tree in one device-to-host transfer."""
        leaves: list[torch.Tensor] = []

        def collect(x: Any) -> Any:
            value = _tensor_of(x)
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
            fetched = _device_ops(device, None).fetch([leaves[i] for i in indices])
            for i, array in zip(indices, fetched):
                arrays[i] = array
        return _nest.map_output(lambda x: arrays[x.index] if isinstance(x, _Leaf) else x, indexed)

    def name_scope(self, scope: str) -> contextlib.AbstractContextManager[Any]:
        """See base class: `torch.profiler.record_function`, only while a profiler records."""
        if torch.compiler.is_compiling() or not torch.autograd.profiler._is_profiler_enabled:
            return _NULL_SCOPE
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
        parsed = _parse_backend_options(options.backend_options)
        return _TorchLoop(step_fn, module, options.compile_step, parsed)

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


BACKEND = TorchBackend()
register_name_scope_hook(BACKEND.name_scope)
register_hook_gate(torch.compiler.is_compiling)
