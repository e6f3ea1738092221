"""The JAX backend: one `jax.jit` call runs the whole inner loop.

Users write `train_step(iterator)` in the same stateful style as on every other
backend: read `self.w.value`, assign new values. For each inner loop the adapter

1. walks the module for its `looproto.Variable`s and lifts their arrays into a
   list (the carried state of a `lax.scan`);
2. pulls `num_steps` batches from the iterator on the host and stacks them
   (`data="stack"`), or -- for an `ArrayDataset` -- only the batch *indices*,
   gathering from a copy of the dataset kept on device (`data="device"`);
3. runs all steps in one jitted `lax.scan`. Inside the traced body the Variables
   are bound to the scan's tracers, `step_fn` runs against an iterator whose
   `next()` yields the current step's slice, and the new values are read back.
   The bindings are always restored (`finally`), so no Variable keeps a tracer;
4. donates the old state buffers and writes the results back into the Variables
   before returning, so actions, summaries and checkpoints see current values.

`value_and_grad(fn, module)` differentiates `fn()` with respect to the module's
trainable variables, the role `nnx.value_and_grad` plays for Flax NNX.

Flax NNX modules held in a `Module` are walked (`JaxBackend.expand`): their
`nnx.Variable`s are discovered and checkpointed, but not lifted into compiled loops.

See `docs/backends/jax.md` for what runs where and the traps.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from looproto import _nest, distributed
from looproto.backends._feed import StepIterator, is_iterator_container
from looproto.backends.base import Loop, LoopOptions, ReduceFn, StepFn
from looproto.backends.numpy import python_loop
from looproto.errors import (
    ConfigError,
    DistributedError,
    LooprotoError,
    ProtocolError,
    ShapeError,
    value_repr,
)
from looproto.module import Module, Variable, register_name_scope_hook, variables_by_path

_trace_state_clean: Callable[[], bool] | None
try:  # 0.26 µs; entering jax.named_scope costs ~2 µs, so skip it outside tracing.
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - a future JAX without it: always enter
    _trace_state_clean = None

__all__ = [
    "BACKEND",
    "BACKEND_OPTIONS",
    "JaxBackend",
    "JaxEngine",
    "TracerLeakError",
    "array_namespace",
    "grad",
    "initialize_distributed",
    "value_and_grad",
]

_log = logging.getLogger("looproto")
_Tracer = jax.core.Tracer

BACKEND_OPTIONS: dict[str, str] = {
    "data": '"stack" (default): pull and stack batches on the host each loop; "device": '
    "keep an `ArrayDataset` on device and send only batch indices",
    "mesh": 'a `jax.sharding.Mesh` or "auto" (all visible devices): data-parallel, batch '
    'dimension sharded, state replicated (default: none in one process, "auto" over '
    "several, `jax.distributed`)",
    "data_axis": "the mesh axis the batch dimension is sharded over (default: its first)",
    "donate": "donate the state buffers to the compiled call (default True)",
    "chunk_size": "steps per compiled call when `num_steps=-1` (default 100)",
}


class TracerLeakError(ProtocolError):
    """A JAX tracer would be stored in a `Variable` outside a looproto-managed trace."""


# ----------------------------------------------------------------------------
# Binding Variables to traced values.

_tls = threading.local()


def _bind_depth() -> int:
    return getattr(_tls, "depth", 0)


def _tracer_guard(variable: Variable, value: Any) -> None:
    """`Variable._assign_hooks` entry: no tracer may be stored outside a bound scope."""
    if isinstance(value, _Tracer) and not getattr(_tls, "depth", 0):
        raise TracerLeakError(
            f"Variable {variable.name!r} was assigned a JAX tracer outside a looproto JAX "
            "loop (for example under a bare `jax.jit`, `jax.grad` or `jax.vmap` of a "
            "stateful method). The tracer would leak out of its trace. Run the step through "
            "`StandardTrainer.train` (the JAX backend's compiled loop), differentiate with "
            "`looproto.backends.jax.value_and_grad`, or pass arrays explicitly."
        )


if _tracer_guard not in Variable._assign_hooks:
    Variable._assign_hooks.append(_tracer_guard)


@contextlib.contextmanager
def _bound(variables: Sequence[Variable], values: Sequence[Any]) -> Any:
    """Binds `variables` to `values`; restores the old values on exit, always."""
    old = [v._value for v in variables]
    _tls.depth = _bind_depth() + 1
    try:
        for variable, value in zip(variables, values):
            variable._value = value
        yield
    finally:
        for variable, value in zip(variables, old):
            variable._value = value
        _tls.depth -= 1


# ----------------------------------------------------------------------------
# Flax NNX (optional; never imported by this module).


# An NNX object can only exist once `flax.nnx` is imported, so looking it up in
# `sys.modules` is enough (and costs nothing when flax is not installed).


def _nnx_variable_type() -> type | None:
    nnx = sys.modules.get("flax.nnx")
    return getattr(nnx, "Variable", None) if nnx is not None else None


def _is_nnx_variable(obj: Any) -> bool:
    cls = _nnx_variable_type()
    return cls is not None and isinstance(obj, cls)


def _nnx_graph_node_types(nnx: Any) -> tuple[type, ...]:
    """NNX's graph-node base classes (`Pytree` since flax 0.11, `Object` before)."""
    names = ("Pytree", "Object", "Module")
    return tuple(t for t in (getattr(nnx, n, None) for n in names) if isinstance(t, type))


def _expand_nnx(obj: Any) -> list[tuple[tuple[Any, ...], Any]] | None:
    """`(path, nnx.Variable)` pairs of an NNX module (or `Rngs`, `Optimizer`), else None.

    NNX's own graph walk is used, so paths are NNX's (`("layers", 0, "kernel")`)
    and a Variable shared by two attributes is listed once, at its first path.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    node_types = _nnx_graph_node_types(nnx)
    if not node_types or not isinstance(obj, node_types):
        return None
    iter_graph = getattr(nnx, "iter_graph", None)
    if iter_graph is None:  # pragma: no cover - every flax with NNX has it today
        raise ProtocolError(
            f"Cannot list the variables of the Flax NNX object {value_repr(obj)}: this "
            "flax has no `nnx.iter_graph`. Install a flax with NNX's graph API (>= 0.8)."
        )
    variable_type = nnx.Variable
    return [
        (tuple(path), node) for path, node in iter_graph(obj) if isinstance(node, variable_type)
    ]


def _nnx_get(variable: Any) -> Any:
    # flax 0.12 deprecates `.value` in favour of `get_value()`/`set_value()`.
    get = getattr(variable, "get_value", None)
    return get() if callable(get) else variable.value


def _nnx_set(variable: Any, value: Any) -> None:
    put = getattr(variable, "set_value", None)
    if callable(put):
        put(value)
    else:
        variable.value = value


def _is_key_array(value: Any) -> bool:
    """A typed PRNG key array (`jax.random.key`, NNX's `RngKey`): stored as its key data."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


# ----------------------------------------------------------------------------
# Gradients over a Module.


def _module_variables(module: Any) -> tuple[list[str], list[Variable]]:
    """Paths and `looproto.Variable`s of `module` (other frameworks' are rejected)."""
    paths: list[str] = []
    variables: list[Variable] = []
    for path, variable in variables_by_path(module).items():
        if isinstance(variable, Variable):
            paths.append(path)
            variables.append(variable)
        elif _is_nnx_variable(variable):
            # NNX refuses writes from inside a foreign `jax.jit` trace, and a value only
            # read there would be baked into the compiled loop as a constant.
            raise ConfigError(
                f"Module variable {path!r} is a Flax NNX `{type(variable).__name__}`. The JAX "
                "backend discovers, checkpoints and restores NNX variables, but lifts only "
                "`looproto.Variable`s into its compiled loops and `value_and_grad`. Hold the "
                "state in `looproto.Variable`s, or train the NNX module with NNX's own "
                "transforms (`nnx.jit`, `nnx.value_and_grad`) in an eager step "
                "(`StandardTrainerOptions(use_compiled_loop=False, use_compiled_step=False)`)."
            )
    return paths, variables


def _is_any_variable(obj: Any) -> bool:
    return isinstance(obj, Variable) or _is_nnx_variable(obj)


def _loop_variables(module: Any) -> list[Variable]:
    """`_module_variables(module)[1]`, without building paths (run on every loop call)."""
    if not isinstance(module, Module):
        return _module_variables(module)[1]
    found = list(module._flatten(predicate=_is_any_variable))
    if not all(isinstance(v, Variable) for v in found):
        return _module_variables(module)[1]  # Raises, naming the NNX variable's path.
    return found


def _is_differentiable(variable: Variable) -> bool:
    return bool(variable.trainable) and jnp.issubdtype(variable._value.dtype, jnp.inexact)


def value_and_grad(
    fn: Callable[[], Any], module: Any, has_aux: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Evaluates `fn()` and its gradient with respect to `module`'s trainable variables.

    `fn` takes no arguments: it reads the module's Variables, as a stateful step
    does. Works eagerly and inside the compiled loop. Values that `fn` assigns to
    Variables (batch-norm statistics, say) are kept, as primal values.

    Args:
        fn: Returns a scalar loss, or `(loss, aux)` when `has_aux`.
        module: A `Module` (or container of them) whose trainable floating-point
            `looproto.Variable`s are differentiated.
        has_aux: `fn` returns `(loss, aux)`.

    Returns:
        `(loss, grads)`, or `((loss, aux), grads)` with `has_aux`; `grads` maps the
        path (as in `variables_by_path`) of each trainable floating-point variable to
        its gradient. Integer and non-trainable variables have no entry.
    """
    paths, variables = _module_variables(module)
    diff = [i for i, v in enumerate(variables) if _is_differentiable(v)]
    params = {paths[i]: variables[i]._value for i in diff}
    diff_vars = [variables[i] for i in diff]

    def pure(p: dict[str, Any]) -> tuple[Any, tuple[Any, list[Any]]]:
        bound = [p[paths[i]] for i in diff]
        with _bound(diff_vars, bound):
            before = [v._value for v in variables]
            out = fn()
            # Keep what `fn` assigned; None marks "unchanged".
            updates = [
                new if new is not old else None
                for new, old in zip((v._value for v in variables), before)
            ]
        if has_aux:
            if not isinstance(out, tuple) or len(out) != 2:
                raise ProtocolError(
                    f"With `has_aux=True`, `fn` must return `(loss, aux)`; received "
                    f"{value_repr(out)}."
                )
            loss, aux = out
        else:
            loss, aux = out, None
        return loss, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(pure, has_aux=True)(params)
    for variable, new in zip(variables, updates):
        if new is not None:
            variable._value = new
    return ((loss, aux) if has_aux else loss), grads


def grad(fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
    """Like `value_and_grad` but returns only `grads` (or `(grads, aux)` with `has_aux`)."""
    value, grads = value_and_grad(fn, module, has_aux=has_aux)
    return (grads, value[1]) if has_aux else grads


def array_namespace() -> Any:
    """The Python array API for JAX arrays: `jax.numpy`, which implements the standard."""
    return jnp


# ----------------------------------------------------------------------------
# The inner loop.

_TWICE_HINT = (
    "The JAX compiled loop feeds exactly one batch per step; batch larger in the dataset, "
    "or run with `use_compiled_loop=False` (a Python loop over a jitted step)."
)


def _next_all(iterator: Any) -> Any:
    """One element from each iterator of a (nested mapping/list of) iterator(s)."""
    if isinstance(iterator, Mapping):
        return {key: _next_all(value) for key, value in iterator.items()}
    if is_iterator_container(iterator):
        return tuple(_next_all(value) for value in iterator)
    return next(iterator)


def _iter_spec(iterator: Any) -> Any:
    """A hashable description of an iterator's nesting (the compiled step depends on it)."""
    if iterator is None:
        return None
    if isinstance(iterator, Mapping):
        return ("map", tuple((k, _iter_spec(v)) for k, v in iterator.items()))
    if is_iterator_container(iterator):
        return ("seq", type(iterator), tuple(_iter_spec(v) for v in iterator))
    return "leaf"


def _step_iterators(spec: Any, batch: Any, step_name: str) -> Any:
    """The nesting `spec`, each leaf a `StepIterator` over its part of `batch`."""
    if spec is None:
        return StepIterator(step_name, _TWICE_HINT)
    if spec == "leaf":
        return StepIterator(step_name, _TWICE_HINT, batch)
    if spec[0] == "map":
        return {k: _step_iterators(s, batch[k], step_name) for k, s in spec[1]}
    return spec[1](_step_iterators(s, b, step_name) for s, b in zip(spec[2], batch))


def _pull(iterator: Any, n: int) -> list[Any]:
    """Up to `n` elements; fewer when the data ends (no element is lost)."""
    if iterator is None:
        return [None] * n
    if not is_iterator_container(iterator):
        return list(itertools.islice(iterator, n))
    out: list[Any] = []
    try:
        for _ in range(n):
            out.append(_next_all(iterator))
    except StopIteration:
        pass
    return out


def _stack_leaves(column: Sequence[Any]) -> Any:
    """Raises ValueError (also for a mix of array and non-array) if shapes differ."""
    try:
        if isinstance(column[0], jax.Array):
            return jnp.stack(column)
        return np.stack(column)
    except TypeError as err:
        raise ValueError(str(err)) from err


def _signature(batch: Any) -> Any:
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves)


def _stack(batches: list[Any]) -> Any:
    first = batches[0]
    # Fast paths for the common batches (an array; a flat dict of arrays, as
    # `ArrayDataset` yields): flattening 100 pytrees costs about as much as stacking.
    if isinstance(first, (np.ndarray, jax.Array)):
        return _stack_leaves(batches)
    if type(first) is dict and all(isinstance(v, (np.ndarray, jax.Array)) for v in first.values()):
        keys = first.keys()
        if all(type(b) is dict and b.keys() == keys for b in batches):
            return {key: _stack_leaves([b[key] for b in batches]) for key in keys}
    flat = [jax.tree.flatten(b) for b in batches]
    treedef = flat[0][1]
    if any(f[1] != treedef for f in flat):  # type: ignore[operator]
        raise ValueError("batches differ in structure")
    return jax.tree.unflatten(treedef, [_stack_leaves(c) for c in zip(*(f[0] for f in flat))])


def _segments(batches: list[Any]) -> list[tuple[int, Any]]:
    """Stacks runs of equally shaped batches: `[(num_steps, stacked), ...]`."""
    if batches[0] is None:
        return [(len(batches), None)]
    try:
        return [(len(batches), _stack(batches))]
    except ValueError:
        pass  # Shapes differ (e.g. a short last batch): one call per run of equal shapes.
    signatures = [_signature(b) for b in batches]
    out: list[tuple[int, Any]] = []
    start = 0
    for i in range(1, len(batches) + 1):
        if i == len(batches) or signatures[i] != signatures[start]:
            out.append((i - start, _stack(batches[start:i])))
            start = i
    return out


def _check_outputs(outputs: Any, step_name: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, (jax.Array, _Tracer, np.ndarray, np.generic, bool, int, float)):
            where = jax.tree_util.keystr(path) or "the output"
            raise ProtocolError(
                f"`{step_name}` returned a non-array at {where}: {value_repr(leaf)} of type "
                f"{type(leaf).__name__}. Under the JAX backend a step returns arrays (or "
                "nests of them), or None."
            )


def _strong(value: Any, like: Any) -> Any:
    """`value` with `like`'s dtype and no weak type, so scan carries keep their type."""
    return jnp.asarray(value, dtype=like.dtype)


def _mesh_processes(mesh: Mesh | None) -> int:
    """How many processes own devices of `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return len({device.process_index for device in mesh.devices.flat})


class _JaxLoop:
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
    ) -> None:
        self._step_fn = step_fn
        self._module = module
        self._scan = scan
        self._data = data
        self._mesh = mesh
        self._data_axis = data_axis
        self._donate = donate
        self._chunk_size = chunk_size
        self._step_name = getattr(step_fn, "__qualname__", None) or value_repr(step_fn)
        self._compiled: dict[Any, tuple[Any, Any]] = {}
        self._device_data: tuple[Any, Any] | None = None  # (source, device copy)
        self._twin: tuple[Any, Any] | None = None  # (dataset config, index dataset)
        self.trace_count = 0
        """How many times `step_fn` was traced (a new batch shape, dtype or `num_steps`)."""
        self._replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self._processes = _mesh_processes(mesh)

    # -- tracing ------------------------------------------------------------

    def _traced_step(
        self, variables: list[Variable], spec: Any, values: list[Any], batch: Any, data: Any
    ) -> tuple[list[Any], Any]:
        """Runs `step_fn` once with `variables` bound to `values`; pure in and out."""
        self.trace_count += 1  # Runs at trace time only: once per compilation.
        if data is not None:  # "device": `batch` holds indices into `data`.
            batch = jax.tree.map(lambda d: d[batch], data)
        step_iterator = _step_iterators(spec, batch, self._step_name)
        known = {id(v) for v in variables}
        with _bound(variables, values):
            try:
                outputs = self._step_fn(step_iterator)
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
            new_values = [v._value for v in variables]
            self._check_module(known)
        _check_outputs(outputs, self._step_name)
        new_values = [_strong(new, old) for new, old in zip(new_values, values)]
        if self._replicated is not None:
            new_values = [lax.with_sharding_constraint(x, self._replicated) for x in new_values]
        return new_values, outputs

    def _check_module(self, known: set[int]) -> None:
        """At trace time: no Variable created in the step, no tracer on an attribute."""
        found = variables_by_path(
            self._module,
            predicate=lambda x: isinstance(x, (Variable, _Tracer)) or _is_nnx_variable(x),
        )
        created = {p: v for p, v in found.items() if isinstance(v, Variable) and id(v) not in known}
        tracers = [p for p, v in found.items() if isinstance(v, _Tracer)]
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

    def _compile(self, variables: list[Variable], spec: Any) -> tuple[Any, Any]:
        donate = (0,) if self._donate else ()

        def scan_loop(values: list[Any], xs: Any, data: Any, length: int) -> list[Any]:
            def body(carry: list[Any], x: Any) -> tuple[list[Any], None]:
                new, _ = self._traced_step(variables, spec, carry, x, data)
                return new, None

            final, _ = lax.scan(body, values, xs, length=length)
            return final

        def one_step(values: list[Any], x: Any, data: Any) -> tuple[list[Any], Any]:
            return self._traced_step(variables, spec, values, x, data)

        return (
            jax.jit(scan_loop, donate_argnums=donate, static_argnums=3),
            jax.jit(one_step, donate_argnums=donate),
        )

    # -- host side ----------------------------------------------------------

    def _lift(self, variables: list[Variable]) -> tuple[list[Any], list[tuple[int, Any]]]:
        """The Variables' arrays for the jitted call; also `(index, dtype)` of those JAX narrows.

        Without `jax_enable_x64`, an int64/float64 NumPy value (the global step) runs
        in 32 bits; `_write_back` returns it to NumPy in its own dtype.
        """
        values = [v._value for v in variables]
        narrowed: list[tuple[int, Any]] = []
        for i, value in enumerate(values):
            if isinstance(value, _Tracer):
                raise TracerLeakError(
                    f"Variable {variables[i].name!r} holds a JAX tracer before the loop starts; "
                    "it leaked from an earlier trace. Re-assign it a concrete array."
                )
            if not isinstance(value, jax.Array):
                dtype = jax.dtypes.canonicalize_dtype(value.dtype)
                if dtype != value.dtype:
                    narrowed.append((i, value.dtype))
                # Cast on the host and let the jitted call transfer it: ~1 µs, against
                # ~15 µs for `device_put` and a device op (~50 µs) for `jnp.asarray(x, dtype)`.
                values[i] = np.asarray(value, dtype=dtype)
            elif value.weak_type:
                values[i] = lax.convert_element_type(value, value.dtype)
        if self._donate and len({id(x) for x in values}) != len(values):
            seen: set[int] = set()
            for i, value in enumerate(values):  # Two Variables, one buffer: donate a copy.
                if id(value) in seen:
                    values[i] = jnp.array(value, copy=True)
                seen.add(id(value))
        if self._replicated is not None:
            values = [
                x
                if getattr(x, "sharding", None) == self._replicated
                else jax.device_put(x, self._replicated)
                for x in values
            ]
        return values, narrowed

    @staticmethod
    def _write_back(
        variables: list[Variable], new: list[Any], narrowed: list[tuple[int, Any]]
    ) -> None:
        for variable, value in zip(variables, new):
            variable._value = value
        if narrowed:  # A (small) host copy, so the dtype never changes.
            # `jax.device_get`'s explicit transfer without its per-call overhead (~10 µs).
            with jax.transfer_guard_device_to_host("allow"):
                for i, dtype in narrowed:
                    variables[i]._value = np.asarray(new[i]).astype(dtype)

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
        variables = _loop_variables(self._module)
        source, data = iterator, None
        if self._data == "device":
            source, data = self._device_dataset(iterator)
        spec = (
            "leaf"
            if source is not None and not is_iterator_container(source)
            else _iter_spec(source)
        )
        key = (spec, *map(id, variables))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(variables, spec)
        try:
            if self._scan and reduce_fn is None:
                steps = self._run_scan(compiled[0], variables, source, num_steps, data)
            else:
                state, steps = self._run_steps(
                    compiled[1], variables, source, num_steps, data, state, reduce_fn
                )
            if self._processes > 1:
                # A failed collective surfaces only when a result is used: here, inside
                # the loop, rather than in `train_loop_end`. (The Controller syncs on the
                # results right after the loop anyway.)
                jax.block_until_ready([v._value for v in variables])
        except Exception as err:
            if self._processes > 1 and _is_peer_failure(err):
                where = f"a collective operation of `{self._step_name}`'s compiled loop"
                raise distributed.peer_failure(err, where) from err
            raise
        finally:
            if data is not None:
                iterator.set_state(source.get_state())
        return state, steps

    def _run_scan(
        self, jitted: Any, variables: list[Variable], source: Any, num_steps: int, data: Any
    ) -> int:
        total = 0
        while num_steps < 0 or total < num_steps:
            want = self._chunk_size if num_steps < 0 else num_steps - total
            batches = _pull(source, want)
            if not batches:
                break
            for length, xs in _segments(batches):
                values, narrowed = self._lift(variables)
                new = jitted(values, self._put_batch(xs, 1), data, length)
                self._write_back(variables, new, narrowed)
            total += len(batches)
            if len(batches) < want:
                break
        if num_steps >= 0 and total < num_steps:
            _log.info("The data iterator is exhausted after %d steps.", total)
        return total

    def _run_steps(
        self,
        jitted: Any,
        variables: list[Variable],
        source: Any,
        num_steps: int,
        data: Any,
        state: Any,
        reduce_fn: ReduceFn | None,
    ) -> tuple[Any, int]:
        steps = 0
        while num_steps < 0 or steps < num_steps:
            pulled = _pull(source, 1)
            if not pulled:
                _log.info("The data iterator is exhausted after %d steps.", steps)
                break
            values, narrowed = self._lift(variables)
            new, outputs = jitted(values, self._put_batch(pulled[0], 0), data)
            self._write_back(variables, new, narrowed)
            if reduce_fn is not None:
                state = reduce_fn(state, outputs)
            steps += 1
        return state, steps


# ----------------------------------------------------------------------------
# Multi-process: jax.distributed.

# What gloo (CPU) and the coordination service say when a peer process is gone.
_PEER_FAILURE_MARKERS = (
    "Gloo",
    "gloo",
    "NCCL",
    "Connection reset by peer",
    "Connection closed by peer",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


_HEARTBEAT_MARGIN = 10  # seconds


def _is_peer_failure(err: BaseException) -> bool:
    """A runtime error of a cross-process collective (not a bug in the step)."""
    if not isinstance(err, (ValueError, RuntimeError, jax.errors.JaxRuntimeError)):
        return False
    if isinstance(err, LooprotoError):
        return False
    text = str(err)
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


def _distributed_client() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


class JaxEngine:
    """`looproto.distributed.Engine` on `jax.distributed` (see `initialize_distributed`).

    Control messages use the key-value store of JAX's coordination service (run by
    process 0), with timeouts; orbax sees the processes (`collective_checkpoints`).
    """

    backend = "jax"
    collective_checkpoints = True

    def __init__(self, timeout: float, owns_runtime: bool) -> None:
        self.process_index = int(jax.process_index())
        self.process_count = int(jax.process_count())
        self.timeout = timeout
        self._owns_runtime = owns_runtime
        self._client = _distributed_client()

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._client.key_value_set(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        return str(self._client.blocking_key_value_get(key, max(int(timeout * 1000), 1)))

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._client.key_value_delete(key)

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """See `looproto.distributed.Engine`: nothing to enter."""
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: shuts down the runtime looproto started."""
        if self._owns_runtime and jax.distributed.is_initialized():
            jax.distributed.shutdown()

    def __repr__(self) -> str:
        return f"JaxEngine(process {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> JaxEngine:
    """Starts `jax.distributed` (or adopts it) for `looproto.distributed.initialize`.

    The coordinator, the number of processes and this process's id come from
    `LOOPROTO_COORDINATOR_ADDRESS`, `LOOPROTO_NUM_PROCESSES` and `LOOPROTO_PROCESS_ID`
    (what `looproto train --num-processes` sets), else from JAX's own cluster
    detection (SLURM, Open MPI, Cloud TPU, ...). `timeout` bounds the wait for every
    process to join and the shutdown barrier; a process whose heartbeats stop counts
    as dead 10 s after that (then JAX itself ends the others). CPU collectives use
    gloo (JAX's default).

    Raises:
        ConfigError: JAX already computed something in this process (the runtime
            must start first), or nothing says where the processes are.
        DistributedError: The processes did not all join within `timeout`.
    """
    if jax.distributed.is_initialized():
        return JaxEngine(timeout, owns_runtime=False)
    env = distributed.environment("jax")
    seconds = max(math.ceil(timeout), 1)
    kwargs: dict[str, Any] = {
        "initialization_timeout": seconds,
        # Later than looproto's own waits (`timeout`): when the coordination service
        # declares a process dead, JAX aborts every other process (its message, not ours).
        "heartbeat_timeout_seconds": seconds + _HEARTBEAT_MARGIN,
        "shutdown_timeout_seconds": seconds,
    }
    if env is not None:
        kwargs.update(
            coordinator_address=env.coordinator,
            num_processes=env.process_count,
            process_id=env.process_index,
        )
    where = env.coordinator if env is not None else "the address JAX's cluster detection found"
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        if "before" in str(err) and "computation" in str(err).lower():
            raise ConfigError(
                "`jax.distributed` must start before JAX computes anything in this process: "
                "call `looproto.distributed.initialize('jax')` first (before building the "
                f"trainer). JAX said: {str(err).splitlines()[0]}"
            ) from err
        raise DistributedError(
            f"JAX process {'?' if env is None else env.process_index} could not join the "
            f"other processes at {where} within {timeout:g} s: {str(err).splitlines()[0]}"
        ) from err
    except ValueError as err:
        if env is None:
            raise ConfigError(
                "Cannot tell where the JAX processes are: set `LOOPROTO_COORDINATOR_ADDRESS`, "
                "`LOOPROTO_NUM_PROCESSES` and `LOOPROTO_PROCESS_ID` (`looproto train "
                "--num-processes N` does), or run under a cluster JAX detects. JAX said: "
                f"{str(err).splitlines()[0]}"
            ) from err
        raise
    return JaxEngine(timeout, owns_runtime=True)


# ----------------------------------------------------------------------------
# The backend object.


def _parse_backend_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown JAX `backend_options` {unknown}; expected some of {sorted(BACKEND_OPTIONS)}."
        )
    data = options.get("data", "stack")
    if data not in ("stack", "device"):
        raise ConfigError(
            f'`backend_options["data"]` must be "stack" or "device"; received {data!r}.'
        )
    mesh = options.get("mesh")
    if mesh is None and jax.process_count() > 1:
        # Several processes: data parallel over all of them, else each would train alone.
        mesh = "auto"
    if isinstance(mesh, str) and mesh == "auto":
        mesh = Mesh(np.array(jax.devices()), ("data",))
    elif mesh is not None and not isinstance(mesh, Mesh):
        raise ConfigError(
            f'`backend_options["mesh"]` must be a `jax.sharding.Mesh` or "auto"; received '
            f"{value_repr(mesh)}."
        )
    data_axis = options.get("data_axis")
    if mesh is not None:
        data_axis = mesh.axis_names[0] if data_axis is None else data_axis
        if data_axis not in mesh.axis_names:
            raise ConfigError(
                f'`backend_options["data_axis"]` {data_axis!r} is not an axis of the mesh '
                f"{tuple(mesh.axis_names)}."
            )
    donate = options.get("donate", True)
    if not isinstance(donate, bool):
        raise ConfigError(f'`backend_options["donate"]` must be a bool; received {donate!r}.')
    chunk = options.get("chunk_size", 100)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(
            f'`backend_options["chunk_size"]` must be a positive int; received {chunk!r}.'
        )
    return {
        "data": data,
        "mesh": mesh,
        "data_axis": data_axis,
        "donate": donate,
        "chunk_size": chunk,
    }


class JaxBackend:
    """See the module docstring."""

    name = "jax"

    def version(self) -> str:
        """See base class."""
        return str(jax.__version__)

    def is_variable(self, obj: Any) -> bool:
        """See base class: `looproto.Variable` and Flax NNX `Variable`s."""
        return isinstance(obj, Variable) or _is_nnx_variable(obj)

    def is_trainable(self, obj: Any) -> bool:
        """See base class: NNX `Param`s, and `looproto.Variable(trainable=True)`."""
        if isinstance(obj, Variable):
            return obj.trainable
        nnx = sys.modules.get("flax.nnx")
        param = getattr(nnx, "Param", None)
        return param is not None and isinstance(obj, param)

    def expand(self, obj: Any) -> Iterable[tuple[tuple[Any, ...], Any]] | None:
        """See base class: the `nnx.Variable`s of a Flax NNX module, by NNX path."""
        return _expand_nnx(obj)

    def to_numpy(self, value: Any) -> np.ndarray[Any, Any]:
        """See base class. A host copy (never a view of a buffer that may be donated).

        A PRNG key array (an NNX `RngKey`) is returned as its raw key data.
        """
        if isinstance(value, Variable):
            value = value.value
        elif _is_nnx_variable(value):
            value = _nnx_get(value)
        if _is_key_array(value):
            value = jax.random.key_data(value)
        return np.array(jax.device_get(value))

    def assign(self, variable: Any, array: np.ndarray[Any, Any]) -> None:
        """See base class. Keeps the dtype (same-kind casts only) and the sharding."""
        nnx_variable = not isinstance(variable, Variable)
        current = _nnx_get(variable) if nnx_variable else variable.value
        key_impl = None
        if _is_key_array(current):  # Restore key data into a typed key of the same impl.
            key_impl = jax.random.key_impl(current)
            current = jax.random.key_data(current)
        array = np.asarray(array)
        if tuple(current.shape) != tuple(array.shape):
            raise ShapeError(
                f"Cannot assign an array of shape {array.shape} to {_name(variable)!r} of "
                f"shape {tuple(current.shape)}."
            )
        if array.dtype != current.dtype:
            if not np.can_cast(array.dtype, current.dtype, casting="same_kind"):
                raise ShapeError(
                    f"Cannot assign an array of dtype {array.dtype} to {_name(variable)!r} of "
                    f"dtype {current.dtype}."
                )
            array = array.astype(current.dtype)
        if isinstance(current, jax.Array):
            new: Any = jax.device_put(array, current.sharding)
        else:
            new = np.array(array, copy=True)
        if key_impl is not None:
            new = jax.random.wrap_key_data(new, impl=key_impl)
        if nnx_variable:
            _nnx_set(variable, new)  # NumPy stays NumPy, as the Variable held it.
        else:
            variable._value = new

    def to_host(self, tree: Any) -> Any:
        """See base class: every leaf's transfer starts before the first is waited for.

        This is `jax.device_get` (an explicit transfer, allowed under a transfer
        guard) at about half its fixed cost, which is paid once per loop.
        """
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        with jax.transfer_guard_device_to_host("allow"):
            return _nest.map_output(_nest.to_numpy_leaf, tree)

    def name_scope(self, scope: str) -> contextlib.AbstractContextManager[Any]:
        """See base class: `jax.named_scope`, entered only while tracing (else ~2 µs)."""
        if _trace_state_clean is not None and _trace_state_clean():
            return contextlib.nullcontext()
        return jax.named_scope(scope.rstrip("/"))

    def make_loop(self, step_fn: StepFn, *, module: Module, options: LoopOptions) -> Loop:
        """See base class and the module docstring.

        `compile_loop` (default): one `jax.jit(lax.scan)` call per loop; with a
        `reduce_fn` (an evaluator reducing into Python state) it falls back to a
        jitted step in a Python loop. `compile_step` only: a jitted step in a
        Python loop. Neither: the eager `python_loop`.
        """
        if not callable(step_fn):
            raise ProtocolError(f"`step_fn` must be callable; received {value_repr(step_fn)}.")
        parsed = _parse_backend_options(options.backend_options)
        if not options.compile_step:
            return python_loop(step_fn)
        return _JaxLoop(step_fn, module, scan=options.compile_loop, **parsed)

    def array_namespace(self) -> Any:
        """See `looproto.backends.jax.array_namespace`."""
        return array_namespace()

    # The gradient helpers, also as methods (`backends.get("jax").value_and_grad`).
    def value_and_grad(
        self, fn: Callable[[], Any], module: Any, has_aux: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """See `looproto.backends.jax.value_and_grad`."""
        return value_and_grad(fn, module, has_aux=has_aux)

    def grad(self, fn: Callable[[], Any], module: Any, has_aux: bool = False) -> Any:
        """See `looproto.backends.jax.grad`."""
        return grad(fn, module, has_aux=has_aux)

    def initialize_distributed(self, timeout: float = distributed.DEFAULT_TIMEOUT) -> JaxEngine:
        """See `looproto.backends.jax.initialize_distributed`."""
        return initialize_distributed(timeout)


def _name(variable: Any) -> str:
    return str(getattr(variable, "name", type(variable).__name__))


BACKEND = JaxBackend()
register_name_scope_hook(BACKEND.name_scope)
