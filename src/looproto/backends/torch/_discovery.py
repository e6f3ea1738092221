"""Discovery of torch containers: the `(path, variable)` pairs of modules, optimizers, schedulers.

What `TorchBackend.expand` returns for an `nn.Module` (parameters and persistent
buffers, through DDP/`torch.compile` wrappers) and a `torch.optim.Optimizer` (numeric
param-group entries, its flags and strings as one JSON state, and per-parameter state,
with the *pending* state of a fresh optimizer found by a throwaway step; state that is
not numbers or tensors makes it `Unsaveable`); plus the thread-local switch by which
the backend's own walks skip the costly pending state. Objects saved through their
`state_dict()` (LR schedulers, `GradScaler`) are in `_state_dicts.py`.
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

from looproto.backends.base import Unsaveable
from looproto.backends.torch._state_dicts import GroupJSONState, is_array_entry, is_json_entry
from looproto.backends.torch._views import (
    BufferView,
    EntryView,
    FlagView,
    ParamState,
    SlotView,
)
from looproto.errors import value_repr

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


def _numeric(value: Any) -> bool:
    """Numbers, tensors, non-empty lists of numbers: one array each in a checkpoint."""
    return is_array_entry(value) and not isinstance(value, np.ndarray)


def _json_value(value: Any) -> bool:
    """A param-group entry the JSON item holds: a flag, a string, None, or a list of them."""
    if isinstance(value, (list, tuple)):
        return all(map(is_json_entry, value))
    return is_json_entry(value)


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
            }
    _pending_cache[optimizer] = (signature, templates)
    return templates


def _unsaveable_group_entry(optimizer: Any, key: str, value: Any) -> Unsaveable:
    label = type(optimizer).__name__
    return Unsaveable(
        f"the param-group entry {key!r} of {label} holds {value_repr(value)} of type "
        f"{type(value).__name__}, which a checkpoint cannot hold (numbers, tensors, flags, "
        "strings, None). Keep it a number or a tensor, or keep the optimizer out of the "
        "checkpointed tree."
    )


def _unsaveable_slot(optimizer: Any, key: str, value: Any) -> Unsaveable:
    label = type(optimizer).__name__
    return Unsaveable(
        f"{label} keeps {value_repr(value)} of type {type(value).__name__} in a parameter's "
        f"state under {key!r}; a checkpoint holds numbers and fixed-shape tensors there, so "
        f"this {label}'s state cannot be saved (LBFGS keeps its history as lists of "
        "tensors). Use an optimizer whose state is tensors, or keep this one out of the "
        "checkpointed tree and accept that a resumed run starts it afresh."
    )


def optimizer_pairs(optimizer: torch.optim.Optimizer, name: str) -> _Pairs:
    pairs: _Pairs = []
    texts: dict[str, tuple[int, str]] = {}
    for index, group in enumerate(optimizer.param_groups):
        for key in sorted(group):
            if key in ("params", "param_names"):
                continue
            path = ("param_groups", index, key)
            where = f"{name}/param_groups/{index}/{key}"
            if _numeric(group[key]):
                pairs.append((path, EntryView(group, key, where)))
            elif _json_value(group[key]):
                texts[f"param_groups/{index}/{key}"] = (index, key)
            else:
                pairs.append((path, _unsaveable_group_entry(optimizer, key, group[key])))
    if texts:
        pairs.append((("json",), GroupJSONState(optimizer, texts, f"{name}/json")))
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
        entries = state if state else templates.get(id(param), {})
        shown = {k: v for k, v in entries.items() if _numeric(v)}
        record = ParamState(optimizer, param, shown)
        base = "/".join(map(str, (name, "state", *label)))
        for key in sorted(shown):
            pairs.append((("state", *label, key), SlotView(record, key, f"{base}/{key}")))
        for key in sorted(set(entries) - set(shown), key=str):
            pairs.append((("state", *label, key), _unsaveable_slot(optimizer, key, entries[key])))
        pairs.append((("state", *label, "has_state"), FlagView(record, f"{base}/has_state")))
    return pairs
