"""Name scopes: `NameScope`, `name_scope` and `current_name_scope`, tf.name_scope's semantics.

A scope is a per-thread string such as `"outer/inner/"`. Entering a looproto scope
also enters the scope of every loaded backend's framework (`tf.name_scope`,
`jax.named_scope`, `torch.profiler.record_function`; see
`looproto.backends.scope_hooks`), so module names show in TF graphs, JAX HLO and the
torch profiler.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

from looproto import backends
from looproto.errors import ProtocolError, value_repr

__all__ = ["NameScope", "current_name_scope", "name_scope"]

_local = threading.local()


def current_name_scope() -> str:
    """Returns the active name scope: `""` at top level, else a string ending in `/`."""
    return getattr(_local, "scope", "")


_Entered = list[AbstractContextManager[Any]]


def _entries(scope: NameScope) -> list[tuple[str, _Entered | None]]:
    """This thread's stack of `(previous scope, entered framework scopes)` for `scope`."""
    try:
        by_scope: dict[int, list[tuple[str, _Entered | None]]] = _local.entries
    except AttributeError:
        by_scope = _local.entries = {}
    return by_scope.setdefault(id(scope), [])


class NameScope:
    """A re-entrant context manager that sets the current name scope.

    Entering a scope named `n` inside scope `cur` gives `cur + n + "/"`; a name that
    already ends in `/` is absolute and replaces the current scope; `""` clears it.
    `with scope as s` yields the full scope string. This is `tf.name_scope` in eager
    mode: scopes are never uniquified.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise ProtocolError(
                f"`name` of a name scope must be a string; received {value_repr(name)} "
                f"of type {type(name).__name__}."
            )
        self._name = name

    @property
    def name(self) -> str:
        """The name this scope was built with (for a `Module`, its full scope)."""
        return self._name

    def __enter__(self) -> str:
        hooks = backends.scope_hooks()
        previous = current_name_scope()
        name = self._name
        if not name:
            scope = ""
        elif name.endswith("/"):
            scope = name
        else:
            scope = previous + name + "/"
        frameworks: _Entered | None = None
        if hooks and scope and not backends.hooks_gated():
            # A plain list rather than an ExitStack, and no-op scopes skipped: torch.compile
            # (Dynamo) traces user-defined `__enter__`/`__exit__`, but neither ExitStack's
            # bookkeeping nor `nullcontext`'s methods called directly.
            frameworks = []
            try:
                for hook in hooks:
                    context = hook(scope)
                    if isinstance(context, nullcontext):
                        continue
                    context.__enter__()
                    frameworks.append(context)
            except BaseException:
                _exit_all(frameworks, None, None, None)
                raise
        # What to restore on exit is kept per thread (and per scope object): a module's
        # scope may be entered by several threads at once, which exit in any order.
        _entries(self).append((previous, frameworks))
        _local.scope = scope
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entries = _entries(self)
        previous, frameworks = entries.pop()
        if not entries:
            del _local.entries[id(self)]
        _local.scope = previous
        if frameworks is not None:
            _exit_all(frameworks, exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"NameScope({self._name!r})"


def _exit_all(
    contexts: _Entered,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Exits `contexts` innermost first, all of them even if one raises.

    Their return values are ignored: a framework scope never swallows `exc`.
    """
    if contexts:
        context = contexts.pop()
        try:
            context.__exit__(exc_type, exc, tb)
        finally:
            _exit_all(contexts, exc_type, exc, tb)


def name_scope(name: str) -> NameScope:
    """Returns a `NameScope` for `name` (see `NameScope`).

    Example:
        >>> with name_scope("outer") as outer:
        ...     with name_scope("inner") as inner:
        ...         pass
        >>> outer, inner
        ('outer/', 'outer/inner/')
    """
    return NameScope(name)
