"""Discovery of torch containers: the `(path, variable)` pairs of modules, optimizers, schedulers.

What `TorchBackend.expand` returns for an `nn.Module` (parameters and persistent
buffers, through DDP/`torch.compile` wrappers), a `torch.optim.Optimizer` (param-group
entries and per-parameter state, with the *pending* state of a fresh optimizer found
by a throwaway step) and an LR scheduler; plus the thread-local switch by which the
backend's own walks skip the costly pending state.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from looproto.backends.torch._views import (
    BufferView,
    EntryView,
    FlagView,
    ParamState,
    SlotView,
)

_log = logging.getLogger("looproto")

walk_state = threading.local()  # `.shallow`: walks that need no optimizer pending state.


@contextlib.contextmanager
def shallow_walk(tensors_only: bool = False) -> Iterator[None]:
    """Walks inside skip the (costly) pending optimizer state: only the backend's own walks.

    With `tensors_only`, `nn.Module`s yield their raw tensors without paths (the
    loop's walk, once per loop, only needs their devices).
    """
    previous = getattr(walk_state, "shallow", False), getattr(walk_state, "tensors_only", False)
    walk_state.shallow, walk_state.tensors_only = True, tensors_only
    try:
        yield
    finally:
        walk_state.shallow, walk_state.tensors_only = previous


def own_tensors(module: torch.nn.Module) -> Iterator[Any]:
    yield from module._parameters.values()
    yield from module._buffers.values()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
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


_Pairs = list[tuple[tuple[Any, ...], Any]]


def module_pairs(module: torch.nn.Module) -> _Pairs:
    module = unwrap(module)
    pairs: _Pairs = [(tuple(n.split(".")), p) for n, p in module.named_parameters()]
    for prefix, sub in module.named_modules():
        for buffer, value in sub._buffers.items():
            if value is None or buffer in sub._non_persistent_buffers_set:
                continue  # Like `state_dict()`: derived buffers are not state.
            name = f"{prefix}.{buffer}" if prefix else buffer
            pairs.append((tuple(name.split(".")), BufferView(sub, buffer, name.replace(".", "/"))))
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


def optimizer_pairs(optimizer: torch.optim.Optimizer, name: str) -> _Pairs:
    pairs: _Pairs = []
    for index, group in enumerate(optimizer.param_groups):
        for key in sorted(group):
            if key not in ("params", "param_names") and _numeric(group[key]):
                path = ("param_groups", index, key)
                pairs.append((path, EntryView(group, key, f"{name}/param_groups/{index}/{key}")))
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
        record = ParamState(optimizer, param, shown)
        base = "/".join(map(str, (name, "state", *label)))
        for key in sorted(shown):
            pairs.append((("state", *label, key), SlotView(record, key, f"{base}/{key}")))
        pairs.append((("state", *label, "has_state"), FlagView(record, f"{base}/has_state")))
    return pairs


def scheduler_pairs(scheduler: Any, name: str) -> _Pairs:
    pairs: _Pairs = []
    for key, value in sorted(scheduler.state_dict().items()):
        if _numeric(value) and hasattr(scheduler, key):
            short = key.lstrip("_")
            pairs.append(((short,), EntryView(scheduler, key, f"{name}/{short}")))
    return pairs
