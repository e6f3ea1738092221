"""The compiled inner loop, `JaxLoop`: one `jax.jit(lax.scan)` call per `train(n)`.

This is the loop `JaxBackend.make_loop` returns; the package docstring lists its four
steps (lift the Variables and NNX objects, pull and stack the batches, scan the traced
step, write back). It also holds the trace-time checks (no Variable or NNX object
created or stored, no tracer stored on an attribute, array outputs only) and the
host-side moves of state and batches onto a mesh. Batch stacking is in `_batches.py`,
NNX objects in `_nnx_lift.py`, the stale-read checks in `_stale.py`; options are
parsed in `_options.py`.

Summaries a step records (`looproto.summary.scalar`/`histogram`) ride in the scan's
carry, one slot per name, so only the last step's values leave the device. Which
slots a step needs is learnt from its first trace: a trace that records names the
carry lacks stops before anything runs, and the call is compiled again with them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from looproto import _recording, distributed
from looproto.backends._common import is_iterator_container
from looproto.backends.base import ReduceFn, StepFn
from looproto.backends.jax._batches import iter_spec, part_length, pull, segments, step_iterators
from looproto.backends.jax._binding import Tracer, TracerLeakError, bound_to
from looproto.backends.jax._carry import lift, write_back
from looproto.backends.jax._distributed import is_peer_failure
from looproto.backends.jax._nnx import is_nnx_node
from looproto.backends.jax._nnx_lift import NnxLift
from looproto.backends.jax._stale import check_constants, refusing_stale_reads
from looproto.backends.jax._variables import loop_state, pairs
from looproto.errors import (
    ConfigError,
    LooprotoError,
    ProtocolError,
    StaleReadError,
    value_repr,
)
from looproto.module import Variable

_log = logging.getLogger("looproto")

# ----------------------------------------------------------------------------
# The inner loop.


def _check_outputs(outputs: Any, step_name: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, (jax.Array, Tracer, np.ndarray, np.generic, bool, int, float)):
            where = jax.tree_util.keystr(path) or "the output"
            raise ProtocolError(
                f"`{step_name}` returned a non-array at {where}: {value_repr(leaf)} of type "
                f"{type(leaf).__name__}. Under the JAX backend a step returns arrays (or "
                "nests of them), or None."
            )


def _strong(value: Any, like: Any) -> Any:
    """`value` with `like`'s dtype and no weak type, so scan carries keep their type."""
    if hasattr(like, "dtype"):
        return jnp.asarray(value, dtype=like.dtype)
    return jax.tree.map(lambda v, o: jnp.asarray(v, dtype=o.dtype), value, like)  # A tree.


def _nnx_trace_error(err: Exception) -> bool:
    """Flax NNX's refusal to write to an object made outside the current trace."""
    errors = sys.modules.get("flax.errors")
    cls = getattr(errors, "TraceContextError", None)
    return cls is not None and isinstance(err, cls)


def _mesh_processes(mesh: Mesh | None) -> int:
    """How many processes own devices of `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return len({device.process_index for device in mesh.devices.flat})


class _StepRecorder:
    """What one traced step records with `looproto.summary`: name -> (kind, array)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[str, Any]] = {}

    def record(self, kind: str, name: str, value: Any) -> None:
        self.values[name] = (kind, jnp.asarray(value))


_SlotSpec = dict[str, tuple[str, tuple[int, ...], Any]]  # name -> (kind, shape, dtype)


class _NewSummaries(Exception):  # noqa: N818 (a signal between the trace and the loop)
    """Raised while tracing: the step records summaries the scan's carry has no slot for."""

    def __init__(self, spec: _SlotSpec) -> None:
        super().__init__(sorted(spec))
        self.spec = spec


def _spec_of(recorded: dict[str, tuple[str, Any]]) -> _SlotSpec:
    return {name: (kind, tuple(a.shape), a.dtype) for name, (kind, a) in recorded.items()}


class JaxLoop:
    """The loop `JaxBackend.make_loop` returns. See the module docstring."""

    def __init__(
        self,
        step_fn: StepFn,
        module: Any,
        *,
        scan: bool,
        data: str,
        mesh: Mesh | None,
        data_axis: str | None,
        donate: bool,
        chunk_size: int,
        pipeline_chunks: int = 1,
    ) -> None:
        self._step_fn = step_fn
        self._module = module
        self._scan = scan
        self._data = data
        self._mesh = mesh
        self._data_axis = data_axis
        self._donate = donate
        self._chunk_size = chunk_size
        self._pipeline_chunks = pipeline_chunks
        self._step_name = getattr(step_fn, "__qualname__", None) or value_repr(step_fn)
        self._compiled: dict[Any, tuple[Any, Any]] = {}
        self._device_data: tuple[Any, Any] | None = None  # (source, device copy)
        self._twin: tuple[Any, Any] | None = None  # (dataset config, index dataset)
        self.trace_count = 0
        # The scan carry's summary slots, by loop and one step's batch shapes (any length).
        self._slot_specs: dict[Any, _SlotSpec] = {}
        self._kinds: dict[str, str] = {}  # the kind of each name a one-step call records
        """How many times `step_fn` was traced (a new batch shape, dtype or `num_steps`)."""
        self._replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self._processes = _mesh_processes(mesh)

    # -- tracing ------------------------------------------------------------

    def _traced_step(
        self,
        variables: list[Variable],
        nnx: NnxLift | None,
        spec: Any,
        values: list[Any],
        batch: Any,
        data: Any,
    ) -> tuple[list[Any], Any, dict[str, tuple[str, Any]]]:
        """Runs `step_fn` once with `variables` (then `nnx`'s) bound to `values`; pure.

        Returns the new values, the step's outputs and what it recorded with
        `looproto.summary`.
        """
        self.trace_count += 1  # Runs at trace time only: once per compilation.
        if data is not None:  # "device": `batch` holds indices into `data`.
            batch = jax.tree.map(lambda d: d[batch], data)
        step_iterator = step_iterators(spec, batch, self._step_name)
        n = len(variables)
        known = {id(v) for v in variables} | {id(r) for r in (nnx.roots if nnx else ())}
        carried = nnx.describe(self._module) if nnx is not None else {}
        recorder = _StepRecorder()
        with contextlib.ExitStack() as bindings:
            bindings.enter_context(bound_to(variables, values[:n]))
            bindings.enter_context(_recording.recording(recorder))
            if nnx is not None:
                copies = bindings.enter_context(
                    nnx.bound(self._module, values[n:], self._step_name)
                )
            try:
                with refusing_stale_reads(self._step_name):
                    outputs = self._step_fn(step_iterator)
            except StaleReadError:
                raise  # It names the step already.
            except LooprotoError as err:
                raise type(err)(
                    f"In `{self._step_name}` (traced by the JAX backend's compiled loop): {err}"
                ) from err
            except jax.errors.JAXTypeError as err:
                raise ProtocolError(
                    f"`{self._step_name}` cannot be traced by `jax.jit` (JAX backend): "
                    f"{type(err).__name__}: {str(err).splitlines()[0]} Keep the step free of "
                    "Python control flow on array values, or run it eagerly with "
                    "`use_compiled_step=False`."
                ) from err
            except Exception as err:
                if not _nnx_trace_error(err):
                    raise
                raise ProtocolError(
                    f"`{self._step_name}` wrote to a Flax NNX object that the JAX backend's "
                    "compiled loop does not carry, or reached one of its objects through a "
                    "reference kept from before (a bound method, a `functools.partial`, a "
                    "closure) instead of the traced copy the loop put in the module's "
                    "attribute. Reach NNX objects through the module's attributes inside "
                    f"the step (`self.model(x)`). NNX said: {str(err).splitlines()[0]}"
                ) from err
            new_values = [v._value for v in variables]
            if nnx is not None:
                new_values += nnx.read(copies, self._step_name)
            check_constants(self._step_name, carried)
        self._check_module(known)
        _check_outputs(outputs, self._step_name)
        new_values = [_strong(new, old) for new, old in zip(new_values, values)]
        recorded = recorder.values
        if self._replicated is not None:
            new_values = [lax.with_sharding_constraint(x, self._replicated) for x in new_values]
            # One copy per process: the chief writes it without gathering shards.
            recorded = {
                name: (kind, lax.with_sharding_constraint(a, self._replicated))
                for name, (kind, a) in recorded.items()
            }
        return new_values, outputs, recorded

    def _check_module(self, known: set[int]) -> None:
        """At trace time: no Variable or NNX object created in the step, no tracer on an
        attribute (`known`: the ids of the Variables and NNX objects carried)."""
        found: dict[str, Any] = {}
        for path, obj in pairs(
            self._module, lambda x: isinstance(x, (Variable, Tracer)) or is_nnx_node(x)
        ):
            found.setdefault("/".join(map(str, path)), obj)
        created = {p: v for p, v in found.items() if isinstance(v, Variable) and id(v) not in known}
        tracers = [p for p, v in found.items() if isinstance(v, Tracer)]
        stored = [p for p, v in found.items() if is_nnx_node(v) and id(v) not in known]
        if stored:
            raise TracerLeakError(
                f"`{self._step_name}` stored Flax NNX objects at {sorted(stored)} inside the "
                "JAX backend's compiled loop: a traced copy (or an object made there) would "
                "leak out of it. Create NNX objects eagerly, outside the step."
            )
        if created:
            for variable in created.values():  # Scrub: never leave a tracer behind.
                aval = variable._value
                variable._value = np.zeros(aval.shape, aval.dtype)
            raise ProtocolError(
                f"`{self._step_name}` created Variables {sorted(created)} inside the JAX "
                "backend's compiled loop; they are not part of the carried state (their values "
                "were reset to zeros). Create all state eagerly before training (in "
                "`__init__` or `train_loop_begin`)."
            )
        if tracers:
            raise TracerLeakError(
                f"`{self._step_name}` stored traced values on plain attributes {tracers}; they "
                "would leak out of the compiled loop. Keep state in `looproto.Variable`s, or "
                "return it from the step."
            )

    def _compile(
        self, variables: list[Variable], nnx: NnxLift | None, spec: Any
    ) -> tuple[Any, Any]:
        donate = (0,) if self._donate else ()

        def scan_loop(
            values: list[Any], slots: dict[str, Any], xs: Any, data: Any, length: int
        ) -> tuple[list[Any], dict[str, Any]]:
            def body(
                carry: tuple[list[Any], dict[str, Any]], x: Any
            ) -> tuple[tuple[list[Any], dict[str, Any]], None]:
                new, _, recorded = self._traced_step(variables, nnx, spec, carry[0], x, data)
                found = _spec_of(recorded)
                expected = {
                    name: (found.get(name, ("",))[0], tuple(a.shape), a.dtype)
                    for name, a in carry[1].items()
                }
                if found != expected:
                    raise _NewSummaries(found)
                return (new, {name: recorded[name][1] for name in carry[1]}), None

            (final, slots), _ = lax.scan(body, (values, slots), xs, length=length)
            return final, slots

        def one_step(values: list[Any], x: Any, data: Any) -> tuple[list[Any], Any, dict[str, Any]]:
            new, outputs, recorded = self._traced_step(variables, nnx, spec, values, x, data)
            for name, (kind, _) in recorded.items():  # at trace time: plain Python
                self._kinds[name] = kind
            return new, outputs, {name: a for name, (_, a) in recorded.items()}

        return (
            jax.jit(scan_loop, donate_argnums=donate, static_argnums=4),
            jax.jit(one_step, donate_argnums=donate),
        )

    # -- host side ----------------------------------------------------------

    def _lift(
        self, variables: list[Variable], nnx: NnxLift | None
    ) -> tuple[list[Any], list[tuple[int, Any]]]:
        """The carried values of this call (see `_carry.lift`)."""
        return lift(variables, nnx, donate=self._donate, replicated=self._replicated)

    def _put_batch(self, xs: Any, batch_axis: int) -> Any:
        """Shards the batch dimension over the mesh (no-op without one)."""
        mesh = self._mesh
        if mesh is None or xs is None:
            return xs
        spec = PartitionSpec(*([None] * batch_axis), self._data_axis)
        size = mesh.shape[self._data_axis]
        # Over several processes each holds only its slice of the global batch
        # (`ArrayDataset(shard=...)`); JAX assembles the global array from the slices.
        local = size // self._processes
        sharding = NamedSharding(mesh, spec)

        def put(x: Any) -> Any:
            if np.ndim(x) <= batch_axis:
                return jax.device_put(x, self._replicated)
            if np.shape(x)[batch_axis] % local:
                what = "this process's slice of the batch" if self._processes > 1 else "batch"
                raise ConfigError(
                    f"The {what} dimension ({np.shape(x)[batch_axis]}) must be divisible by "
                    f"the {local} devices of mesh axis {self._data_axis!r} in this process."
                )
            if self._processes > 1:
                return jax.make_array_from_process_local_data(sharding, np.asarray(x))
            return jax.device_put(x, sharding)

        return jax.tree.map(put, xs)

    def _device_dataset(self, iterator: Any) -> tuple[Any, Any]:
        """`(index iterator, device data)` for `data="device"`."""
        from looproto.data import ArrayDataset, ArrayIterator

        dataset = getattr(iterator, "_dataset", None)
        if not isinstance(iterator, ArrayIterator) or not isinstance(dataset, ArrayDataset):
            raise ConfigError(
                '`backend_options={"data": "device"}` needs the iterator of a '
                f"`looproto.data.ArrayDataset`; received {value_repr(iterator)}. Use "
                '`"data": "stack"` for other iterators.'
            )
        if self._device_data is None or self._device_data[0] is not dataset.data:
            put = self._replicated if self._replicated is not None else None
            self._device_data = (dataset.data, jax.device_put(dataset.data, put))
        # A twin dataset over example indices follows the same order as the real one.
        # It is kept between calls: building it allocates an index per example.
        config = (
            dataset.num_examples,
            dataset.batch_size,
            dataset.shuffle,
            dataset.seed,
            dataset.epochs,
            dataset.drop_remainder,
            dataset.shard,
        )
        if self._twin is None or self._twin[0] != config:
            twin = ArrayDataset(
                np.arange(dataset.num_examples, dtype=np.int32),
                dataset.batch_size,
                shuffle=dataset.shuffle,
                seed=dataset.seed,
                epochs=dataset.epochs,
                drop_remainder=dataset.drop_remainder,
                shard=dataset.shard,
            )
            self._twin = (config, twin)
        indices = iter(self._twin[1])
        indices.set_state(iterator.get_state())
        return indices, self._device_data[1]

    def __call__(
        self,
        iterator: Any,
        num_steps: int,
        state: Any = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Any, int]:
        variables, roots = loop_state(self._module)
        nnx = NnxLift(roots) if roots else None
        source, data = iterator, None
        if self._data == "device":
            source, data = self._device_dataset(iterator)
        spec = (
            "leaf"
            if source is not None and not is_iterator_container(source)
            else iter_spec(source)
        )
        key = (spec, *map(id, variables)) if nnx is None else (spec, *map(id, variables), nnx.key)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(variables, nnx, spec)
        try:
            if self._scan and reduce_fn is None:
                steps = self._run_scan(compiled[0], key, variables, nnx, source, num_steps, data)
            else:
                state, steps = self._run_steps(
                    compiled[1], variables, nnx, source, num_steps, data, state, reduce_fn
                )
            if self._processes > 1:
                # A failed collective surfaces only when a result is used: here, inside
                # the loop, rather than in `train_loop_end`. (The Controller syncs on the
                # results right after the loop anyway.)
                jax.block_until_ready([v._value for v in variables])
        except Exception as err:
            if self._processes > 1 and is_peer_failure(err):
                where = f"a collective operation of `{self._step_name}`'s compiled loop"
                raise distributed.peer_failure(err, where) from err
            raise
        finally:
            if data is not None:
                iterator.set_state(source.get_state())
        return state, steps

    def _run_scan(
        self,
        jitted: Any,
        key: Any,
        variables: list[Variable],
        nnx: NnxLift | None,
        source: Any,
        num_steps: int,
        data: Any,
    ) -> int:
        """Calls of `part_length` steps, each dispatched before the next one's batches
        are pulled and put (host and device overlap); every batch pulled is consumed
        here. NumPy values JAX narrows (a host copy: a wait) return at the end only."""
        total = 0
        recorded: dict[str, tuple[str, Any]] = {}
        loop = self._chunk_size if num_steps < 0 else num_steps
        sub = part_length(loop, self._pipeline_chunks)
        pipelined = sub < loop
        narrowed: list[tuple[int, Any]] = []
        new: Any = None
        try:
            while num_steps < 0 or total < num_steps:
                want = sub if num_steps < 0 else min(sub, num_steps - total)
                batches = pull(source, want)
                if not batches:
                    break
                for length, xs in segments(batches):
                    xs = self._put_batch(xs, 1)
                    if pipelined and self._mesh is None and xs is not None:
                        xs = jax.device_put(xs)  # Asynchronous: overlaps the running call.
                    values, lifted_narrowed = self._lift(variables, nnx)
                    narrowed = lifted_narrowed if new is None else narrowed  # (the first's)
                    shapes = (key, tuple(np.shape(x)[1:] for x in jax.tree.leaves(xs)))
                    try:
                        spec = self._slot_specs.get(shapes, {})
                        new, slots = jitted(values, self._slots(spec), xs, data, length)
                    except _NewSummaries as found:
                        # Only traced, nothing ran (nor was donated): compile with the slots.
                        spec = self._slot_specs[shapes] = found.spec
                        new, slots = jitted(values, self._slots(spec), xs, data, length)
                    write_back(variables, nnx, new, [] if pipelined else lifted_narrowed)
                    recorded.update({name: (spec[name][0], a) for name, a in slots.items()})
                total += len(batches)
                if len(batches) < want:
                    break
        finally:
            if pipelined and narrowed and new is not None:
                write_back(variables, nnx, new, narrowed)
        if num_steps >= 0 and total < num_steps:
            _log.info("The data iterator is exhausted after %d steps.", total)
        _recording.deliver(recorded)
        return total

    def _slots(self, spec: _SlotSpec) -> dict[str, Any]:
        """The carry's summary slots before a scan: zeros of each recorded shape."""
        slots = {name: np.zeros(shape, dtype) for name, (_, shape, dtype) in spec.items()}
        if self._replicated is not None and slots:
            return jax.device_put(slots, self._replicated)
        return slots

    def _run_steps(
        self,
        jitted: Any,
        variables: list[Variable],
        nnx: NnxLift | None,
        source: Any,
        num_steps: int,
        data: Any,
        state: Any,
        reduce_fn: ReduceFn | None,
    ) -> tuple[Any, int]:
        steps = 0
        recorded: dict[str, tuple[str, Any]] = {}
        while num_steps < 0 or steps < num_steps:
            pulled = pull(source, 1)
            if not pulled:
                # The normal end of an evaluation until the data ends: not news.
                level = logging.DEBUG if num_steps < 0 else logging.INFO
                _log.log(level, "The data iterator is exhausted after %d steps.", steps)
                break
            values, narrowed = self._lift(variables, nnx)
            new, outputs, step_recorded = jitted(values, self._put_batch(pulled[0], 0), data)
            write_back(variables, nnx, new, narrowed)
            recorded.update({name: (self._kinds[name], a) for name, a in step_recorded.items()})
            if reduce_fn is not None:
                state = reduce_fn(state, outputs)
            steps += 1
        _recording.deliver(recorded)
        return state, steps
