"""The backend registry: backends by name, and what the core asks about frameworks.

This is the one place where looproto's core meets frameworks. A backend is
registered with one call, `register(...)`, which says everything looproto must know
before the framework is imported: its name, which packages' objects it understands,
how to install it, how its processes find each other, its JSON tags. The backend
object itself is loaded when it is first needed (`get("jax")`, or an object of its
framework met in a module tree); its optional hooks (`SupportsAssignHook`,
`SupportsHookGate`) and its name scope are installed then. The core asks the registry --
`for_object`, `hooks_gated`, `scope_hooks` -- and never names a framework.

Backends come from three places, in this order of precedence:

1. `register(...)` called by a program or a package it imports;
2. the ones shipped with looproto (`numpy`, `jax`, `tensorflow`, `torch`), each of
   which registers itself in its own package (`looproto/backends/<name>/`);
3. the `looproto.backends` entry-point group, whose entries point at a backend
   instance, a backend class or a zero-argument factory function
   (`"my_pkg.backend:make_backend"`), looked up when a name is not otherwise known.

Importing this package imports no framework. The default backend is
`LOOPROTO_BACKEND` from the environment, else `numpy`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from looproto.backends.base import (
    Backend,
    Engine,
    IteratorState,
    Launcher,
    Loop,
    LoopOptions,
    MetricAdapter,
    ReduceFn,
    StepFn,
    SupportsArrayAPI,
    SupportsAssignHook,
    SupportsDistributed,
    SupportsDtypes,
    SupportsGlobalValues,
    SupportsGradients,
    SupportsHookGate,
    SupportsHyperparameters,
    SupportsIteratorState,
    SupportsMetrics,
    SupportsStateJSON,
    Unsaveable,
    WorkerEnvironment,
)
from looproto.errors import BackendNotAvailableError, ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "Backend",
    "Engine",
    "IteratorState",
    "Launcher",
    "Loop",
    "LoopOptions",
    "MetricAdapter",
    "ReduceFn",
    "StepFn",
    "SupportsArrayAPI",
    "SupportsDistributed",
    "SupportsDtypes",
    "SupportsGlobalValues",
    "SupportsGradients",
    "SupportsAssignHook",
    "SupportsHookGate",
    "SupportsHyperparameters",
    "SupportsIteratorState",
    "SupportsMetrics",
    "SupportsStateJSON",
    "Unsaveable",
    "WorkerEnvironment",
    "assign_hooks",
    "available",
    "canonical_name",
    "default_name",
    "for_object",
    "get",
    "hooks_gated",
    "installed",
    "json_tag_owner",
    "launcher",
    "numpy_dtype",
    "read_hooks",
    "register",
    "scope_hooks",
    "to_numpy",
]

ENTRY_POINT_GROUP = "looproto.backends"
ENV_VAR = "LOOPROTO_BACKEND"

# The packages of the backends that ship with looproto. Importing one imports no
# framework: it only registers its backend. The order is the order in which backends
# are asked about a package several understand (Keras: TensorFlow first).
_SHIPPED = ("numpy", "tensorflow", "jax", "torch")


@dataclasses.dataclass
class _Entry:
    name: str
    factory: Callable[[], Any] | str | Backend
    packages: tuple[str, ...]
    install: str | None
    launcher: Launcher | None
    json_tags: tuple[str, ...]
    backend: Backend | None = None


_entries: dict[str, _Entry] = {}
_aliases: dict[str, str] = {}
_shipped_registered = False
# Backends whose framework may be imported at any time; loaded once it is (`scope_hooks`).
_waiting: list[_Entry] = []
_by_type: dict[type, tuple[Backend, ...]] = {}

assign_hooks: list[Callable[[Any, Any], bool | None]] = []
"""The loaded backends' `on_assign` hooks, which `Variable.assign` calls (read-only)."""
read_hooks: list[Callable[[Any], None]] = []
"""Hooks `Variable.value` calls on every read; a backend adds one only while it traces."""
_scope_hooks: list[Callable[[str], AbstractContextManager[Any]]] = []
_gates: list[Callable[[], bool]] = []


# ----------------------------------------------------------------------------
# Registering


def register(
    backend: Backend | str,
    factory: Callable[[], Backend] | str | None = None,
    *,
    packages: Sequence[str] = (),
    aliases: Sequence[str] = (),
    install: str | None = None,
    launcher: Launcher | None = None,
    json_tags: Sequence[str] = (),
) -> None:
    """Registers a backend: everything looproto must know about a framework, in one call.

    Either `register(backend_object, ...)`, or `register(name, factory, ...)` where
    `factory` is a zero-argument callable or a `"module:attribute"` string naming the
    backend object, loaded on first use so that the framework is imported only then.
    A name registered again replaces the earlier registration.

    Example:
        >>> from looproto.backends.numpy import NumpyBackend
        >>> class Strict(NumpyBackend):
        ...     name = "strict"
        >>> register(Strict(), aliases=("strict_numpy",))
        >>> get("strict_numpy").name
        'strict'

    Args:
        backend: The backend object, or the name to register a `factory` under.
        factory: With a name: what makes the backend when it is first needed.
        packages: The top-level packages whose objects this backend understands, the
            framework's own first (e.g. `("torch", "torch_xla", "torchdata")`). Objects
            of these packages found in a `Module` are asked of this backend, and once
            the first package is imported the backend is loaded at the next name scope,
            so that its scopes mirror looproto's.
        aliases: Other names `get` accepts for it (`"pytorch"`).
        install: What to `pip install` when the framework is missing.
        launcher: How its processes find each other (`Launcher`), for multi-process runs.
        json_tags: The tags of `SupportsStateJSON` values it writes into checkpoints.

    Raises:
        ConfigError: An argument has the wrong type.
    """
    if isinstance(backend, str):
        name = backend
        if factory is None:
            raise ConfigError(
                f"`register({name!r})` needs a `factory` (a callable or a 'module:attribute' "
                "string), or pass the backend object itself."
            )
        made: Callable[[], Any] | str | Backend = factory
    else:
        if factory is not None:
            raise ConfigError(
                "`register(backend, factory)`: pass a backend object alone, or a name and a "
                f"factory; received backend={backend!r}."
            )
        if not isinstance(backend, Backend):
            raise ConfigError(
                f"`backend` must follow `looproto.backends.Backend`; received {backend!r}."
            )
        name, made = backend.name, backend
    if not isinstance(name, str) or not name:
        raise ConfigError(f"`name` must be a non-empty string; received {name!r}.")
    _register_shipped()
    _unregister(name)
    entry = _Entry(
        name=name,
        factory=made,
        packages=_strings(packages, "packages"),
        install=install,
        launcher=launcher,
        json_tags=_strings(json_tags, "json_tags"),
    )
    _entries[name] = entry
    for alias in _strings(aliases, "aliases"):
        _aliases[alias] = name
    if entry.packages:
        _waiting.append(entry)
    _by_type.clear()
    if not isinstance(made, (str, type)) and isinstance(made, Backend):
        _load(entry)


def _strings(values: Sequence[str], argument: str) -> tuple[str, ...]:
    if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(
            f"`{argument}` must be a sequence of non-empty strings; received {values!r}."
        )
    return tuple(values)


def _unregister(name: str) -> None:
    old = _entries.pop(name, None)
    if old is None:
        return
    for alias in [a for a, target in _aliases.items() if target == name]:
        del _aliases[alias]
    if old in _waiting:
        _waiting.remove(old)
    if old.backend is not None:
        _uninstall(old.backend)


def _register_shipped() -> None:
    global _shipped_registered
    if _shipped_registered:
        return
    _shipped_registered = True
    for name in _SHIPPED:
        importlib.import_module(f"looproto.backends.{name}")


# ----------------------------------------------------------------------------
# Looking backends up


def default_name() -> str:
    """`LOOPROTO_BACKEND` if set, else `"numpy"`."""
    return os.environ.get(ENV_VAR) or "numpy"


def canonical_name(name: str) -> str:
    """The registered name for `name` or one of its aliases (`"tf"` -> `"tensorflow"`)."""
    _register_shipped()
    return _aliases.get(name, name)


def available() -> list[str]:
    """Names of all backends that can be asked for (installed framework or not)."""
    _register_shipped()
    return sorted(set(_entries) | set(_entry_points()))


def get(name: str | None = None) -> Backend:
    """Returns the backend called `name` (default: `default_name()`), loading it once.

    Raises:
        ConfigError: No backend has that name; the message lists `available()`.
        BackendNotAvailableError: The backend exists but its framework is not
            installed; the message names what to install.
    """
    if name is None:
        name = default_name()
    if not isinstance(name, str):
        raise ConfigError(f"`backend` must be a string; received {name!r}.")
    name = canonical_name(name)
    entry = _entries.get(name)
    if entry is None:
        entry = _from_entry_point(name)
    if entry.backend is not None:
        return entry.backend
    return _load(entry)


def installed() -> dict[str, str]:
    """Maps each available backend to its framework version, or why it cannot load."""
    report: dict[str, str] = {}
    for name in available():
        try:
            report[name] = get(name).version()
        except (BackendNotAvailableError, ConfigError) as err:
            report[name] = f"not usable: {err}"
    return report


def launcher(name: str) -> Launcher | None:
    """The `Launcher` registered for backend `name` (None: it has no multi-process engine).

    Loads no framework.

    Raises:
        ConfigError: No backend has that name.
    """
    entry = _entries.get(canonical_name(name))
    if entry is None:
        entry = _from_entry_point(name)
    return entry.launcher


def json_tag_owner(tag: str) -> str | None:
    """The name of the backend registered with JSON tag `tag`, else None."""
    _register_shipped()
    for entry in _entries.values():
        if tag in entry.json_tags:
            return entry.name
    return None


def _load(entry: _Entry) -> Backend:
    made = entry.factory
    if isinstance(made, str):
        module_name, _, attribute = made.partition(":")
        try:
            made = getattr(importlib.import_module(module_name), attribute)
        except ImportError as err:
            install = entry.install or entry.name
            raise BackendNotAvailableError(
                f"The `{entry.name}` backend needs a framework that is not installed ({err}). "
                f"Install it with: pip install '{install}'"
            ) from err
    # A factory function or a backend class is called; a backend instance is used.
    is_instance = isinstance(made, Backend) and not isinstance(made, type)
    backend = made() if callable(made) and not is_instance else made
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"The factory of backend `{entry.name}` gave {backend!r}, which does not follow "
            "`looproto.backends.Backend`."
        )
    entry.backend = backend
    if entry in _waiting:
        _waiting.remove(entry)
    _install(backend, mirrors_scopes=bool(entry.packages))
    _by_type.clear()
    return backend


def _entry_points() -> dict[str, Any]:
    from importlib import metadata  # ~80 ms: only when a name is not otherwise known

    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _from_entry_point(name: str) -> _Entry:
    point = _entry_points().get(name)
    if point is None:
        raise ConfigError(
            f"Unknown backend {name!r}; expected one of {available()} "
            f"(set by argument or the `{ENV_VAR}` environment variable)."
        )
    try:
        obj = point.load()
    except ImportError as err:
        raise BackendNotAvailableError(
            f"The `{name}` backend (entry point {point.value!r}) failed to import: {err}"
        ) from err
    # The entry point's module may have registered the backend itself on import.
    entry = _entries.get(name)
    if entry is None:
        entry = _Entry(name, obj, (), None, None, ())
        _entries[name] = entry
    return entry


# ----------------------------------------------------------------------------
# What the core asks about objects


def for_object(obj: Any) -> tuple[Backend, ...]:
    """The backends that understand objects of `obj`'s framework (maybe none).

    The first base class of `obj`'s type that comes from a registered package decides
    (a user's `class MLP(torch.nn.Module)` lives in the user's package, but is understood
    by the torch backend). Never imports a framework that `obj` does not come from: the
    object exists, so its framework is imported already; a backend that fails to load
    simply does not recognise it.
    """
    cls = type(obj)
    try:
        return _by_type[cls]
    except KeyError:
        pass
    _register_shipped()
    found: list[Backend] = []
    for base in cls.__mro__:
        package = getattr(base, "__module__", "").partition(".")[0]
        names = [e.name for e in _entries.values() if package in e.packages]
        # The shipped backends in `_SHIPPED`'s order whatever order their packages were
        # imported in (importing one registers the others first): Keras -> TensorFlow.
        names.sort(key=lambda n: _SHIPPED.index(n) if n in _SHIPPED else len(_SHIPPED))
        if names:
            for name in names:
                try:
                    found.append(get(name))
                except BackendNotAvailableError:
                    continue
            break
    result = tuple(found)
    _by_type[cls] = result
    return result


def to_numpy(value: Any) -> np.ndarray[Any, Any] | None:
    """A host NumPy copy of a framework array by its backend, else None (no backend knows it)."""
    for backend in for_object(value):
        return backend.to_numpy(value)
    return None


def numpy_dtype(dtype: Any) -> np.dtype[Any]:
    """NumPy's dtype for any framework's dtype (`torch.float32` -> `float32`)."""
    if isinstance(dtype, np.dtype):
        return dtype
    for backend in for_object(dtype):
        if isinstance(backend, SupportsDtypes):
            return backend.numpy_dtype(dtype)
    result: np.dtype[Any] = np.dtype(dtype)
    return result


# ----------------------------------------------------------------------------
# Hooks of the loaded backends


def scope_hooks() -> list[Callable[[str], AbstractContextManager[Any]]]:
    """The framework scopes every `NameScope` enters: one per loaded backend.

    A backend whose framework has been imported since the last call is loaded first,
    so a `tf.Variable` made in a module's scope is named like the module even when
    no one asked for the TensorFlow backend.
    """
    if not _shipped_registered:
        _register_shipped()
    if _waiting:
        _load_imported()
    return _scope_hooks


def _load_imported() -> None:
    for entry in list(_waiting):
        if entry.packages[0] in sys.modules:
            try:
                _load(entry)
            except BackendNotAvailableError:
                _waiting.remove(entry)


def hooks_gated() -> bool:
    """True while a loaded backend says no framework hook may run (`SupportsHookGate`).

    Inside `torch.compile`, for example: Dynamo cannot trace other frameworks' hook
    code, and what those hooks guard cannot happen there. Name scopes check it
    themselves; an `on_assign` hook that calls into its framework checks it first.
    """
    for gate in _gates:  # noqa: SIM110 (a generator costs more; this runs per scope entry)
        if gate():
            return True
    return False


def _install(backend: Backend, mirrors_scopes: bool) -> None:
    # A backend of no framework's packages (NumPy) has no framework scopes to mirror;
    # skipping it keeps `NameScope` free of hooks in a NumPy-only process.
    if mirrors_scopes and backend.name_scope not in _scope_hooks:
        _scope_hooks.append(backend.name_scope)
    if isinstance(backend, SupportsAssignHook) and backend.on_assign not in assign_hooks:
        assign_hooks.append(backend.on_assign)
    if isinstance(backend, SupportsHookGate) and backend.hooks_gated not in _gates:
        _gates.append(backend.hooks_gated)


def _uninstall(backend: Backend) -> None:
    for hooks, hook in (
        (_scope_hooks, backend.name_scope),
        (assign_hooks, getattr(backend, "on_assign", None)),
        (_gates, getattr(backend, "hooks_gated", None)),
    ):
        if hook in hooks:
            hooks.remove(hook)  # type: ignore[arg-type]
