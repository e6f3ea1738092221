"""Flax NNX interop: recognising, listing, reading and writing `nnx.Variable`s.

The JAX backend discovers and checkpoints the variables of Flax NNX modules held in a
`Module` (`JaxBackend.expand`, `to_numpy`, `assign`), but never imports flax: an NNX
object can only exist once `flax.nnx` is imported, so it is looked up in `sys.modules`.
Typed PRNG key arrays (NNX's `RngKey`, `jax.random.key`) are checkpointed as their key
data, so that test (`is_key_array`) is here too.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from looproto.errors import ProtocolError, value_repr

# ----------------------------------------------------------------------------
# Flax NNX (optional; never imported by this module).


# An NNX object can only exist once `flax.nnx` is imported, so looking it up in
# `sys.modules` is enough (and costs nothing when flax is not installed).


def _nnx_variable_type() -> type | None:
    nnx = sys.modules.get("flax.nnx")
    return getattr(nnx, "Variable", None) if nnx is not None else None


def is_nnx_variable(obj: Any) -> bool:
    cls = _nnx_variable_type()
    return cls is not None and isinstance(obj, cls)


def _nnx_graph_node_types(nnx: Any) -> tuple[type, ...]:
    """NNX's graph-node base classes (`Pytree` since flax 0.11, `Object` before)."""
    names = ("Pytree", "Object", "Module")
    return tuple(t for t in (getattr(nnx, n, None) for n in names) if isinstance(t, type))


_node_types: tuple[Any, tuple[type, ...]] = (None, ())


def is_nnx_node(obj: Any) -> bool:
    """A Flax NNX object with state of its own: a graph node (`Module`, `Optimizer`,
    `Rngs`, ...) or an `nnx.Variable`. Run on every leaf of every loop's walk."""
    global _node_types
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return False
    if _node_types[0] is not nnx:  # Once per import of flax, not per call.
        _node_types = (nnx, (nnx.Variable, *_nnx_graph_node_types(nnx)))
    return isinstance(obj, _node_types[1])


def expand_nnx(obj: Any) -> list[tuple[tuple[Any, ...], Any]] | None:
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


def nnx_get(variable: Any) -> Any:
    # flax 0.12 deprecates `.value` in favour of `get_value()`/`set_value()`.
    get = getattr(variable, "get_value", None)
    return get() if callable(get) else variable.value


def nnx_set(variable: Any, value: Any) -> None:
    put = getattr(variable, "set_value", None)
    if callable(put):
        put(value)
    else:
        variable.value = value


def is_key_array(value: Any) -> bool:
    """A typed PRNG key array (`jax.random.key`, NNX's `RngKey`): stored as its key data."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
