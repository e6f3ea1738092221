"""Asynchronous checkpoint saves survive a normal interpreter exit; open managers close.

`CheckpointManager` registers itself here when it opens and when it starts an
asynchronous save; a hook that runs when the main thread finishes (before Python
shuts down the thread pools orbax needs) waits for every such save, then closes the
managers still open: their orbax threads stop before the interpreter does (else they
print tracebacks after the program's own last line) and their directory locks go.
The registries and the hook's installed flag live here only.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

_log = logging.getLogger("looproto")


class Syncable(Protocol):
    """What waits at exit: a manager whose `sync()` waits for its save."""

    def sync(self) -> None:
        """Waits for the save under way, if any."""
        ...

    def close(self) -> None:
        """Waits for the save under way and releases the manager's resources."""
        ...


# Managers with an asynchronous save under way. Strong references: the save must
# finish even if its manager is no longer referenced.
PENDING: set[Syncable] = set()
# Managers not yet closed. Weak: one the program dropped is no longer closed here.
OPEN: weakref.WeakSet[Syncable] = weakref.WeakSet()
_exit_hook_installed = False


def wait_at_exit(manager: Syncable) -> None:
    """Makes interpreter shutdown wait for `manager`'s pending save."""
    PENDING.add(manager)
    _install_hook()


def close_at_exit(manager: Syncable) -> None:
    """Makes interpreter shutdown close `manager` if the program has not."""
    OPEN.add(manager)
    _install_hook()


def _install_hook() -> None:
    global _exit_hook_installed
    if _exit_hook_installed:
        return
    # `atexit` is too late: concurrent.futures shuts its executors down first and
    # orbax's commit then fails. Hooks registered here run before that, newest first
    # (so after-registering is enough), when the main thread finishes.
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - Python < 3.9 or another implementation
        return
    try:
        register(_finish_pending_saves)
    except RuntimeError:  # the interpreter is already shutting down
        return
    _exit_hook_installed = True


def _finish_pending_saves() -> None:
    for manager in list(PENDING):
        try:
            manager.sync()
        except Exception as err:  # an exit hook must not raise: report and go on
            _log.error("An asynchronous checkpoint save failed at exit: %s", err)
    for manager in list(OPEN):
        try:
            manager.close()
        except Exception as err:
            _log.error("Closing a checkpoint manager at exit failed: %s", err)
