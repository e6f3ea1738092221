"""Root pytest configuration: doctests of `src/looproto` skip backends whose framework is absent."""

from __future__ import annotations

import importlib.util

_FRAMEWORKS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}

collect_ignore_glob = (
    [
        f"src/looproto/backends/{name}.py"
        for name, module in _FRAMEWORKS.items()
        if importlib.util.find_spec(module) is None
    ]
    + [
        f"src/looproto/examples/{name}_mlp.py"
        for name, module in _FRAMEWORKS.items()
        if importlib.util.find_spec(module) is None
    ]
    + [
        # The Flax NNX example needs flax and optax besides JAX.
        "src/looproto/examples/flax_mlp.py"
        for module in ("jax", "flax", "optax")
        if importlib.util.find_spec(module) is None
    ][:1]
)
