"""Multi-process training on each framework's own distributed engine.

looproto brings no communication of its own. Each backend hands the work to the
engine its users already run:

* **torch**: `torch.distributed` (gloo on CPU, NCCL on GPU) with the model in
  `DistributedDataParallel`, launched by `torchrun` or `looproto train --num-processes`;
* **jax**: `jax.distributed.initialize` and one global `Mesh` over every process's
  devices (gloo collectives on CPU);
* **tensorflow**: `tf.distribute.MultiWorkerMirroredStrategy` from `TF_CONFIG`.

This module is the framework-neutral surface over them. `initialize(backend)` asks
the backend for its engine (`looproto.backends.SupportsDistributed`) and makes it
the active one; after that `process_index()`,
`process_count()`, `is_chief()`, `barrier()`, `all_gather()` and `check_same()`
work the same on every engine. Without `initialize` (or with one process) they
describe a single process: index 0 of 1, the chief, and every collective is a
no-op. Importing this module imports no framework. The local launcher behind
`looproto train --num-processes` is `looproto.run.launch`.

What looproto does with it:

* `SummaryManager` writes only on the chief (process 0);
* `CheckpointManager.save` and `restore` are called on every process. Under JAX,
  orbax coordinates the processes itself (process 0 writes the metadata and commit
  markers); under torch and TensorFlow, whose processes orbax cannot see, the chief
  writes and the others wait at a barrier. Before each save the processes compare
  the CRC-32 of every array (a checkpoint holds one copy, so replicas must agree),
  and before a restore they compare which checkpoint they chose;
* the `Controller` checks that the global step agrees after a restore and at the
  end of `train()`;
* `ArrayDataset(..., shard=distributed.shard())` gives each process its slice of
  every global batch.

The small control messages (`barrier`, `all_gather`) go through the engine's own
key-value store (torch's `TCPStore`, the JAX and TensorFlow coordination services),
with the run's timeout. A process that died or stopped responding makes the others
raise `DistributedError` within that timeout; see `docs/distributed.md` for what
each engine detects, and how fast.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Final

from looproto import backends
from looproto._validate import positive_number
from looproto.backends.base import Engine, SupportsDistributed, WorkerEnvironment
from looproto.errors import BackendNotAvailableError, ConfigError, DistributedError, value_repr

__all__ = [
    "DEFAULT_TIMEOUT",
    "Engine",
    "WorkerEnvironment",
    "all_gather",
    "barrier",
    "check_same",
    "engine",
    "engines",
    "environment",
    "initialize",
    "is_chief",
    "is_initialized",
    "peer_failure",
    "process_count",
    "process_index",
    "scope",
    "shard",
    "shutdown",
]

_log = logging.getLogger("looproto")

DEFAULT_TIMEOUT: Final = 300.0
"""Seconds a process waits for the others (start-up, barriers, collectives) by default."""

MSG_PEER_FAILURE: Final = (
    "Process {index} of {count}: {where} failed, so another process has died or stopped "
    "responding (the run's timeout is {timeout:g} s, `[distributed] timeout`). Look at the "
    "other processes' output for the first error. Cause: {cause}"
)


_engine: Engine | None = None
_rounds = itertools.count()


# ----------------------------------------------------------------------------
# The active engine


def initialize(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Engine:
    """Starts (or adopts) `backend`'s distributed engine and makes it the active one.

    Call it once per process, before the trainer is built and (for JAX and
    TensorFlow) before the framework computes anything. `looproto train` calls it
    when it runs as one of several processes. The engine reads its framework's own
    environment: `torchrun`'s `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`,
    `TF_CONFIG`, or for JAX `LOOPROTO_COORDINATOR_ADDRESS`/`LOOPROTO_NUM_PROCESSES`/
    `LOOPROTO_PROCESS_ID` (else JAX's cluster detection). A process group, JAX
    runtime or strategy the program already started is adopted.

    Args:
        backend: The backend's name; default `looproto.backends.default_name()`.
        timeout: Seconds any process waits for the others: to start, at barriers
            and in collectives. A process that died or hangs makes the others raise
            `DistributedError` within about this long.

    Returns:
        The active `Engine`.

    Raises:
        ConfigError: The backend has no distributed engine, `timeout` is not a
            positive number, or another engine is already active.
        DistributedError: The other processes did not join within `timeout`.
    """
    global _engine
    positive_number(timeout, "timeout", unit=" of seconds")
    name = backends.default_name() if backend is None else backend
    adapter = backends.get(name)
    if _engine is not None:
        if _engine.backend != adapter.name:
            raise ConfigError(
                f"`distributed.initialize({name!r})`: the {_engine.backend!r} engine is "
                "already active in this process; one process runs one engine."
            )
        return _engine
    if not isinstance(adapter, SupportsDistributed):
        raise ConfigError(
            f"The {adapter.name!r} backend has no distributed engine; multi-process "
            f"training runs on {engines()}."
        )
    started = adapter.initialize_distributed(timeout=float(timeout))
    if not isinstance(started, Engine):
        raise ConfigError(
            f"`{adapter.name}` backend's `initialize_distributed` returned "
            f"{value_repr(started)}, which does not follow `looproto.distributed.Engine`."
        )
    _engine = started
    _log.info(
        "distributed: process %d of %d (%s engine)",
        started.process_index,
        started.process_count,
        started.backend,
    )
    return started


def shutdown() -> None:
    """Shuts the active engine down cleanly (every process calls it), if there is one."""
    global _engine
    current, _engine = _engine, None
    if current is not None:
        current.shutdown()


def engine() -> Engine | None:
    """The active engine, or None (one process)."""
    return _engine


def is_initialized() -> bool:
    """Whether an engine is active."""
    return _engine is not None


def process_index() -> int:
    """This process's index (0 without an active engine)."""
    return 0 if _engine is None else _engine.process_index


def process_count() -> int:
    """How many processes take part (1 without an active engine)."""
    return 1 if _engine is None else _engine.process_count


def is_chief() -> bool:
    """Whether this is process 0, the one that writes summaries and leads checkpoints."""
    return process_index() == 0


def shard() -> tuple[int, int]:
    """`(process_index(), process_count())`: pass as `ArrayDataset(..., shard=...)`.

    Example:
        >>> from looproto import distributed
        >>> distributed.shard()  # no engine: one process
        (0, 1)
    """
    return process_index(), process_count()


def scope() -> AbstractContextManager[Any]:
    """The active engine's scope for building trainers (a null context without one)."""
    return contextlib.nullcontext() if _engine is None else _engine.scope()


# ----------------------------------------------------------------------------
# Control messages


# Words of the line that says what went wrong, in the frameworks' multi-line errors.
_TELLING = ("unhealthy", "timed out", "timeout", "connection", "heartbeat", "closed", "reset",
            "aborted", "unavailable", "deadline")  # fmt: skip


def _first_line(err: BaseException) -> str:
    """`Type: line`, the line being the one that names the failure (else the first)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    telling = [line for line in lines if any(word in line.lower() for word in _TELLING)]
    line = (telling or lines or [""])[0]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def peer_failure(err: BaseException, where: str) -> DistributedError:
    """The `DistributedError` for a failed collective or wait (`where` says which)."""
    current = _engine
    index, count = (0, 1) if current is None else (current.process_index, current.process_count)
    timeout = DEFAULT_TIMEOUT if current is None else current.timeout
    return DistributedError(
        MSG_PEER_FAILURE.format(
            index=index, count=count, where=where, timeout=timeout, cause=_first_line(err)
        )
    )


def all_gather(value: Any, what: str) -> list[Any]:
    """Every process's `value` (JSON data), in process order.

    Every process must call it, in the same order, with the same `what`; a process
    that reaches another `all_gather` (or `barrier`) first means the processes are
    out of step, and is reported.

    Args:
        value: JSON-serialisable data.
        what: Where in the run this is ("checkpoint 100", say), for error messages.

    Raises:
        DistributedError: Another process did not answer within the timeout, or is
            at a different point of the run.
    """
    current = _engine
    if current is None or current.process_count == 1:
        return [value]
    me, count = current.process_index, current.process_count
    round_ = next(_rounds)
    payload = json.dumps({"what": what, "value": value})
    try:
        current.key_value_set(f"looproto/gather/{round_}/{me}", payload)
    except Exception as err:
        raise peer_failure(err, f"publishing this process's state at {what}") from err
    values: list[Any] = []
    deadline = time.monotonic() + current.timeout
    for other in range(count):
        if other == me:
            values.append(value)
            continue
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            raw = current.key_value_get(f"looproto/gather/{round_}/{other}", remaining)
        except Exception as err:
            raise peer_failure(err, f"waiting for process {other} at {what}") from err
        entry = json.loads(raw)
        if entry["what"] != what:
            raise DistributedError(
                f"Process {me} of {count} is at {what}, but process {other} is at "
                f"{entry['what']}: the processes are out of step (they must run the same "
                "steps, saves and evaluations in the same order)."
            )
        values.append(entry["value"])
    if round_:
        # Every process has read the previous round: it finished it before publishing this one.
        with contextlib.suppress(Exception):
            current.key_value_delete(f"looproto/gather/{round_ - 1}/{me}")
    return values


def barrier(what: str) -> None:
    """Waits until every process reaches the barrier named `what` (see `all_gather`)."""
    all_gather(None, what)


def check_same(values: Mapping[str, Any], what: str, hint: str = "") -> None:
    """Raises `DistributedError` unless every process passes equal `values`.

    Args:
        values: Name -> JSON data (a step, a CRC-32, ...); every process passes the
            same names.
        what: What is compared, for the message ("the global step", say).
        hint: A sentence added to the message: what it means, how to fix it.
    """
    gathered = all_gather(dict(values), what)
    if all(entry == gathered[0] for entry in gathered):
        return
    differing = sorted(
        key
        for key in set().union(*gathered)
        if len({json.dumps(entry.get(key), sort_keys=True) for entry in gathered}) > 1
    )
    shown = differing[:10]
    lines = [
        f"  {key!r}: "
        + ", ".join(f"process {i}: {value_repr(e.get(key))}" for i, e in enumerate(gathered))
        for key in shown
    ]
    more = f"\n  ... and {len(differing) - len(shown)} more" if len(differing) > len(shown) else ""
    raise DistributedError(
        f"The processes disagree on {what} ({len(differing)} difference(s)):\n"
        + "\n".join(lines)
        + more
        + (f"\n{hint}" if hint else "")
    )


# ----------------------------------------------------------------------------
# The environment of a worker process


def environment(backend: str, environ: Mapping[str, str] | None = None) -> WorkerEnvironment | None:
    """This process's place in a multi-process run of `backend`, or None (not launched so).

    Reads the variables the backend's engine reads (its `looproto.backends.Launcher`):
    torch `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (as `torchrun` sets them);
    JAX `LOOPROTO_PROCESS_ID`, `LOOPROTO_NUM_PROCESSES`, `LOOPROTO_COORDINATOR_ADDRESS`;
    TensorFlow `TF_CONFIG`. No framework is imported.

    Raises:
        ConfigError: The variables are there but malformed, or no backend has that name.
    """
    launcher = backends.launcher(backend)
    if launcher is None:
        return None
    return launcher.environment(os.environ if environ is None else environ)


def engines() -> list[str]:
    """The backends that have a multi-process engine (a registered `Launcher`)."""
    return [name for name in backends.available() if _has_launcher(name)]


def _has_launcher(name: str) -> bool:
    try:
        return backends.launcher(name) is not None
    except (ConfigError, BackendNotAvailableError):
        return False
