"""The inner loop: `num_steps` calls of the (compiled) step with one host sync at the end.

`TorchLoop` is what `TorchBackend.make_loop` returns: it walks the module for its
device and the NumPy Variables to lift onto it (`_Lifted`), feeds one batch per step
through `StepIterator`s, runs the step compiled once (or eagerly), keeps the on-device
NaN record (`_Watch`), and fetches everything back in one transfer. See the package
docstring (`looproto.backends.torch`) for the whole story. What steps record with
`looproto.summary` stays on the device (`_Recorder`) until the loop hands it over.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from looproto import _recording, backends, distributed
from looproto.backends._common import NO_DATA, StepIterator, is_iterator_container
from looproto.backends.base import ReduceFn, StepFn
from looproto.backends.torch._device import DeviceOps, device_ops, same_device, to_device
from looproto.backends.torch._discovery import shallow_walk
from looproto.backends.torch._distributed import is_peer_failure
from looproto.backends.torch._errors import NonFiniteError, graph_break_message
from looproto.backends.torch._tensors import tensor_of
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module import Module as ModuleBase
from looproto.module import NameScope, Variable, backend_for_variable, variables_by_path

_log = logging.getLogger("looproto")
NULL_SCOPE = contextlib.nullcontext()

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


class _Recorder:
    """The latest value of each name a step records, detached, on its device.

    A compiled step stores into `values` as a side effect Dynamo replays after the
    graph; no host sync happens until the Controller writes the summary.
    """

    def __init__(self) -> None:
        self.values: dict[str, tuple[str, Any]] = {}

    def record(self, kind: str, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.values[name] = (kind, value)


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


class TorchLoop:
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
        self._ops: DeviceOps = DeviceOps(torch.device("cpu"))
        self._call: Callable[[Any], Any] = step_fn
        self._watch: _Watch | None = None
        self._output_names: list[str] | None = None
        self._recorder = _Recorder()

    # -- building -----------------------------------------------------------

    def _walk(self) -> tuple[torch.device, list[Variable]]:
        """The loop's device and the NumPy Variables to lift (one walk per loop)."""
        devices: set[torch.device] = set()
        lift: list[Variable] = []
        with shallow_walk(tensors_only=True):
            # Leaves only (no path strings): paths are worked out only for an error.
            found = (
                self._module._flatten(predicate=_is_state)
                if isinstance(self._module, ModuleBase)
                else variables_by_path(self._module, predicate=_is_state).values()
            )
            for variable in found:
                value = tensor_of(variable)
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
        if wanted is not None and not same_device(wanted, device):
            raise ConfigError(
                f'`backend_options["device"]` is {str(wanted)!r} but the module\'s tensors '
                f"are on {self._device_listing()}. Move the model there first."
            )
        return device, lift

    def _device_listing(self) -> str:
        first: dict[torch.device, str] = {}
        with shallow_walk():
            for path, variable in variables_by_path(self._module).items():
                value = tensor_of(variable)
                if isinstance(value, torch.Tensor):
                    first.setdefault(value.device, path)
        return ", ".join(f"{str(d)!r} (e.g. {p!r})" for d, p in first.items())

    def _build(self, device: torch.device) -> None:
        """Device ops, the NaN watch and the (compiled) step for `device`; once per device."""
        opts = self._opts
        # Warm looproto's type -> backend cache for tensors and dtypes here: filling it
        # inside a compiled step (`Variable.assign(0)`, `Variable.dtype` ask it) would be
        # a graph break.
        backend_for_variable(torch.zeros(()))
        backends.numpy_dtype(torch.float32)
        self._device = device
        self._ops = device_ops(device, opts["mode"])
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
            else NULL_SCOPE
        )
        steps, ok = 0, False
        recorder = self._recorder
        recorder.values.clear()
        try:
            with patch, _recording.recording(recorder):
                while num_steps < 0 or steps < num_steps:
                    try:
                        for source, leaf in sources:
                            leaf.feed(to_device(next(source), device))
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
            raise ProtocolError(graph_break_message(self._step_name, err)) from None
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            limit = torch._dynamo.config.recompile_limit
            raise ProtocolError(
                f"`{self._step_name}` was recompiled on every call until torch's recompile "
                f"limit (`torch._dynamo.config.recompile_limit` = {limit}): something it reads "
                "changes from step to step (a Python value on the trainer, say). Keep such "
                "state in a `looproto.Variable` or a tensor."
            ) from None
        except Exception as err:
            if is_peer_failure(err):
                where = f"a collective operation in `{self._step_name}` (DDP's all-reduce)"
                raise distributed.peer_failure(err, where) from err
            raise
        finally:
            for _, leaf in sources:
                leaf.feed(NO_DATA)  # Do not keep the last batch alive on device.
            record = self._finish(ops, lifted, watch, ok, steps)
        _recording.deliver(recorder.values)
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
        self, ops: DeviceOps, lifted: _Lifted, watch: _Watch | None, ok: bool, steps: int
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
