"""Root pytest configuration: doctests of `src/looproto` skip code whose framework is absent."""

from __future__ import annotations

import importlib.util

_FRAMEWORKS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}

collect_ignore_glob = [
    f"src/looproto/backends/{name}.py"
    for name, module in _FRAMEWORKS.items()
    if importlib.util.find_spec(module) is None
] + [
    f"src/looproto/examples/{name}_mlp.py"
    for name, module in _FRAMEWORKS.items()
    if importlib.util.find_spec(module) is None
]
# The Flax NNX example needs flax and optax besides JAX.
if any(importlib.util.find_spec(module) is None for module in ("jax", "flax", "optax")):
    collect_ignore_glob += ["src/looproto/examples/flax_mlp.py"]
# Orbit's API (`looproto.orbit`) is TensorFlow code.
if importlib.util.find_spec("tensorflow") is None:
    collect_ignore_glob += ["src/looproto/orbit/*", "src/looproto/orbit/*/*"]
