"""Backends by name: `get("jax")`, `available()`, `default_name()`.

Importing this package imports no framework. A backend's module (and so its
framework) is imported when the backend is first asked for. Backends come from
three places, in this order of precedence:

1. `register(name, factory)` at run time;
2. the ones shipped with looproto (`numpy`, `jax`, `tensorflow`, `torch`);
3. the `looproto.backends` entry-point group, whose entries point at a backend
   instance, a backend class or a zero-argument factory function
   (`"my_pkg.backend:make_backend"`).

The default backend is `LOOPROTO_BACKEND` from the environment, else `numpy`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

from looproto.backends.base import Backend, Loop, LoopOptions, ReduceFn, StepFn
from looproto.errors import BackendNotAvailableError, ConfigError

__all__ = [
    "Backend",
    "Loop",
    "LoopOptions",
    "ReduceFn",
    "StepFn",
    "available",
    "default_name",
    "get",
    "installed",
    "register",
]

ENTRY_POINT_GROUP = "looproto.backends"
ENV_VAR = "LOOPROTO_BACKEND"

_BUILTIN: dict[str, str] = {
    "numpy": "looproto.backends.numpy",
    "jax": "looproto.backends.jax",
    "tensorflow": "looproto.backends.tensorflow",
    "torch": "looproto.backends.torch",
}
_ALIASES = {"np": "numpy", "tf": "tensorflow", "pytorch": "torch"}
# What to `pip install` for a builtin backend whose framework is missing.
_EXTRAS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}

_registered: dict[str, Callable[[], Backend]] = {}
_loaded: dict[str, Backend] = {}


def _builtin_names() -> list[str]:
    # A builtin counts only if its adapter ships in this install.
    return [name for name, mod in _BUILTIN.items() if importlib.util.find_spec(mod) is not None]


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of all backends that can be asked for (installed framework or not)."""
    names = set(_registered) | set(_builtin_names()) | set(_entry_points())
    return sorted(names)


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Registers a backend under `name`; `factory()` is called on first `get(name)`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"`name` must be a non-empty string; received {name!r}.")
    _registered[name] = factory
    _loaded.pop(name, None)


def default_name() -> str:
    """`LOOPROTO_BACKEND` if set, else `"numpy"`."""
    return os.environ.get(ENV_VAR) or "numpy"


def get(name: str | None = None) -> Backend:
    """Returns the backend called `name` (default: `default_name()`), loading it once.

    Raises:
        ConfigError: No backend has that name; the message lists `available()`.
        BackendNotAvailableError: The backend exists but its framework is not
            installed; the message names the pip extra to install.
    """
    if name is None:
        name = default_name()
    if not isinstance(name, str):
        raise ConfigError(f"`backend` must be a string; received {name!r}.")
    name = _ALIASES.get(name, name)
    try:
        return _loaded[name]
    except KeyError:
        pass
    backend = _load(name)
    _loaded[name] = backend
    return backend


def _load(name: str) -> Backend:
    if name in _registered:
        return _registered[name]()
    if name in _BUILTIN and name in _builtin_names():
        try:
            module = importlib.import_module(_BUILTIN[name])
        except ImportError as err:
            extra = _EXTRAS.get(name, name)
            raise BackendNotAvailableError(
                f"The `{name}` backend needs a framework that is not installed ({err}). "
                f"Install it with: pip install 'looproto[{extra}]'"
            ) from err
        backend: Backend = module.BACKEND
        return backend
    eps = _entry_points()
    if name in eps:
        try:
            obj: Any = eps[name].load()
        except ImportError as err:
            raise BackendNotAvailableError(
                f"The `{name}` backend (entry point {eps[name].value!r}) failed to import: {err}"
            ) from err
        # A factory function or a backend class is called; a backend instance is used.
        is_instance = isinstance(obj, Backend) and not isinstance(obj, type)
        backend = obj() if callable(obj) and not is_instance else obj
        if not isinstance(backend, Backend):
            raise ConfigError(
                f"Entry point {eps[name].value!r} for backend `{name}` did not give an "
                "object following `looproto.backends.Backend`."
            )
        return backend
    raise ConfigError(
        f"Unknown backend {name!r}; expected one of {available()} "
        f"(set by argument or the `{ENV_VAR}` environment variable)."
    )


def installed() -> dict[str, str]:
    """Maps each available backend to its framework version, or why it cannot load."""
    report: dict[str, str] = {}
    for name in available():
        try:
            report[name] = get(name).version()
        except (BackendNotAvailableError, ConfigError) as err:
            report[name] = f"not usable: {err}"
    return report
