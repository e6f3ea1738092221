"""Multi-process training on each framework's own distributed engine.

looproto brings no communication of its own. Each backend hands the work to the
engine its users already run:

* **torch**: `torch.distributed` (gloo on CPU, NCCL on GPU) with the model in
  `DistributedDataParallel`, launched by `torchrun` or `looproto train --num-processes`;
* **jax**: `jax.distributed.initialize` and one global `Mesh` over every process's
  devices (gloo collectives on CPU);
* **tensorflow**: `tf.distribute.MultiWorkerMirroredStrategy` from `TF_CONFIG`.

This module is the framework-neutral surface over them. `initialize(backend)` asks
the backend for its engine (the backend's optional `initialize_distributed(timeout=)`
method) and makes it the active one; after that `process_index()`,
`process_count()`, `is_chief()`, `barrier()`, `all_gather()` and `check_same()`
work the same on every engine. Without `initialize` (or with one process) they
describe a single process: index 0 of 1, the chief, and every collective is a
no-op. Importing this module imports no framework.

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
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol, runtime_checkable

from looproto.errors import ConfigError, DistributedError, value_repr

__all__ = [
    "DEFAULT_TIMEOUT",
    "Engine",
    "WorkerEnvironment",
    "all_gather",
    "barrier",
    "check_same",
    "engine",
    "environment",
    "free_ports",
    "initialize",
    "is_chief",
    "is_initialized",
    "launch",
    "peer_failure",
    "process_count",
    "process_index",
    "scope",
    "shard",
    "shutdown",
    "worker_environment",
]

_log = logging.getLogger("looproto")

DEFAULT_TIMEOUT: Final = 300.0
"""Seconds a process waits for the others (start-up, barriers, collectives) by default."""

# The environment `looproto train --num-processes` gives a JAX worker (JAX itself
# reads only `JAX_COORDINATOR_ADDRESS`, and detects clusters such as SLURM or Cloud TPU).
ENV_COORDINATOR: Final = "LOOPROTO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES: Final = "LOOPROTO_NUM_PROCESSES"
ENV_PROCESS_ID: Final = "LOOPROTO_PROCESS_ID"

# Backends with a distributed engine, and how many ports a local launch needs.
_PORTS: Final = {"torch": 1, "jax": 1, "tensorflow": None}  # None: one per process

MSG_PEER_FAILURE: Final = (
    "Process {index} of {count}: {where} failed, so another process has died or stopped "
    "responding (the run's timeout is {timeout:g} s, `[distributed] timeout`). Look at the "
    "other processes' output for the first error. Cause: {cause}"
)


@runtime_checkable
class Engine(Protocol):
    """What a backend's distributed engine supplies (see `initialize`).

    Attributes:
        backend: The backend's name (`"torch"`, `"jax"`, `"tensorflow"`).
        process_index: This process's index, `0 <= process_index < process_count`.
        process_count: How many processes take part.
        timeout: Seconds to wait for another process before giving up.
        collective_checkpoints: Whether orbax sees the processes (JAX): then every
            process calls orbax's save and orbax decides who writes what. False: the
            chief writes and the others wait for it.
    """

    backend: str
    process_index: int
    process_count: int
    timeout: float
    collective_checkpoints: bool

    def key_value_set(self, key: str, value: str) -> None:
        """Publishes `value` under `key` in the engine's key-value store."""
        ...

    def key_value_get(self, key: str, timeout: float) -> str:
        """Waits up to `timeout` seconds for `key`; raises if it does not appear."""
        ...

    def key_value_delete(self, key: str) -> None:
        """Removes `key` (it was read by every process)."""
        ...

    def scope(self) -> AbstractContextManager[Any]:
        """Entered while the trainer is built (`strategy.scope()` on TensorFlow)."""
        ...

    def shutdown(self) -> None:
        """Leaves the process group (a clean exit; every process calls it)."""
        ...


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
    from looproto import backends

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(
            f"`timeout` must be a positive number of seconds; received timeout={timeout!r}."
        )
    name = backends.default_name() if backend is None else backend
    adapter = backends.get(name)
    if _engine is not None:
        if _engine.backend != adapter.name:
            raise ConfigError(
                f"`distributed.initialize({name!r})`: the {_engine.backend!r} engine is "
                "already active in this process; one process runs one engine."
            )
        return _engine
    start = getattr(adapter, "initialize_distributed", None)
    if start is None:
        raise ConfigError(
            f"The {adapter.name!r} backend has no distributed engine; multi-process "
            f"training runs on {sorted(_PORTS)}."
        )
    started = start(timeout=float(timeout))
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


@dataclasses.dataclass(frozen=True)
class WorkerEnvironment:
    """Where a process sits in a multi-process run, as its environment says.

    Attributes:
        process_index: This process's index.
        process_count: How many processes the run has.
        coordinator: `host:port` of the coordinator (torch's `MASTER_ADDR:MASTER_PORT`,
            JAX's coordinator, TensorFlow's first task), or None where it is not set.
    """

    process_index: int
    process_count: int
    coordinator: str | None


def _env_int(environ: Mapping[str, str], key: str) -> int:
    text = environ.get(key, "")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"The environment variable `{key}` must be an integer; received {text!r}."
        ) from None


def _checked(index: int, count: int, source: str) -> None:
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"{source}: the process index must satisfy 0 <= index < count; received "
            f"index={index}, count={count}."
        )


def environment(backend: str, environ: Mapping[str, str] | None = None) -> WorkerEnvironment | None:
    """This process's place in a multi-process run of `backend`, or None (not launched so).

    Reads the variables the backend's engine reads: torch `RANK`, `WORLD_SIZE`,
    `MASTER_ADDR`, `MASTER_PORT` (as `torchrun` sets them); JAX
    `LOOPROTO_PROCESS_ID`, `LOOPROTO_NUM_PROCESSES`, `LOOPROTO_COORDINATOR_ADDRESS`;
    TensorFlow `TF_CONFIG`. No framework is imported.

    Raises:
        ConfigError: The variables are there but malformed.
    """
    env = os.environ if environ is None else environ
    backend = _canonical(backend)
    if backend == "torch":
        if "WORLD_SIZE" not in env:
            return None
        index, count = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        _checked(index, count, "`RANK`/`WORLD_SIZE`")
        host, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        return WorkerEnvironment(index, count, f"{host}:{port}" if host and port else None)
    if backend == "jax":
        if ENV_NUM_PROCESSES not in env:
            return None
        index, count = _env_int(env, ENV_PROCESS_ID), _env_int(env, ENV_NUM_PROCESSES)
        _checked(index, count, f"`{ENV_PROCESS_ID}`/`{ENV_NUM_PROCESSES}`")
        coordinator = env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS")
        if not coordinator:
            raise ConfigError(
                f"`{ENV_NUM_PROCESSES}` is set but `{ENV_COORDINATOR}` is not; set it to the "
                "`host:port` process 0 listens on."
            )
        return WorkerEnvironment(index, count, coordinator)
    if backend == "tensorflow":
        text = env.get("TF_CONFIG")
        if not text:
            return None
        return _tf_config_environment(text)
    return None


def _canonical(backend: str) -> str:
    from looproto import backends

    return backends._ALIASES.get(backend, backend)


def _tf_config_environment(text: str) -> WorkerEnvironment:
    try:
        config = json.loads(text)
        cluster = config["cluster"]
        task = config["task"]
        chiefs = list(cluster.get("chief", []))
        workers = list(cluster.get("worker", []))
        task_type, task_index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            "`TF_CONFIG` must be JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}; '
            f"received {value_repr(text)} ({type(err).__name__}: {err})."
        ) from None
    if task_type not in ("chief", "worker"):
        raise ConfigError(
            f"`TF_CONFIG` task type {task_type!r}: looproto runs `MultiWorkerMirroredStrategy` "
            "tasks of type 'chief' or 'worker'."
        )
    # MultiWorkerMirroredStrategy's numbering: the chief first, then the workers.
    index = task_index if task_type == "chief" else task_index + len(chiefs)
    count = len(chiefs) + len(workers)
    _checked(index, count, "`TF_CONFIG`")
    leader = (chiefs or workers)[0]
    return WorkerEnvironment(index, count, str(leader))


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` TCP ports free on `host` right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_environment(
    backend: str, process_index: int, num_processes: int, ports: Sequence[int], host: str
) -> dict[str, str]:
    """The environment variables of local worker `process_index` (see `launch`).

    Args:
        backend: `"torch"`, `"jax"` or `"tensorflow"`.
        process_index: The worker's index.
        num_processes: How many workers there are.
        ports: Free ports: one for torch and JAX, one per worker for TensorFlow.
        host: The address the workers reach each other at.

    Raises:
        ConfigError: The backend has no distributed engine, or too few ports.
    """
    backend = _canonical(backend)
    needed = _ports_needed(backend, num_processes)
    if len(ports) < needed:
        raise ConfigError(
            f"A {backend} launch of {num_processes} processes needs {needed} port(s); "
            f"received {list(ports)}."
        )
    if backend == "torch":
        # What `torchrun --nproc-per-node=N` gives each worker on one node.
        env = {
            "RANK": str(process_index),
            "LOCAL_RANK": str(process_index),
            "GROUP_RANK": "0",
            "WORLD_SIZE": str(num_processes),
            "LOCAL_WORLD_SIZE": str(num_processes),
            "MASTER_ADDR": host,
            "MASTER_PORT": str(ports[0]),
        }
        if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default, for the same reason:
            env["OMP_NUM_THREADS"] = "1"  # N processes must not each use every core
        return env
    if backend == "jax":
        return {
            ENV_COORDINATOR: f"{host}:{ports[0]}",
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_index),
        }
    config = {
        "cluster": {"worker": [f"{host}:{port}" for port in ports[:num_processes]]},
        "task": {"type": "worker", "index": process_index},
    }
    return {"TF_CONFIG": json.dumps(config)}


def _ports_needed(backend: str, num_processes: int) -> int:
    if backend not in _PORTS:
        raise ConfigError(
            f"The {backend!r} backend has no distributed engine; multi-process training "
            f"runs on {sorted(_PORTS)}."
        )
    return _PORTS[backend] or num_processes


# ----------------------------------------------------------------------------
# The local launcher


def launch(
    command: Sequence[str],
    *,
    backend: str,
    num_processes: int,
    timeout: float = DEFAULT_TIMEOUT,
    host: str = "127.0.0.1",
    environ: Mapping[str, str] | None = None,
    grace: float | None = None,
) -> int:
    """Runs `command` as `num_processes` local workers of `backend`; returns an exit status.

    Each worker gets its place in the run through the environment
    (`worker_environment`), with ports chosen free at launch. The launcher waits for
    all of them. When one fails, the others should fail on their own (they lose
    their peer, within `timeout`); any still running `grace` seconds later are
    killed (SIGKILL: JAX's and TensorFlow's runtimes catch SIGTERM). Ctrl-C stops
    every worker. The exit status of each worker that failed is printed.

    Args:
        command: The worker's command line (the same for every worker).
        backend: Whose environment the workers get: `"torch"`, `"jax"`, `"tensorflow"`.
        num_processes: How many workers.
        timeout: The run's timeout (`[distributed] timeout`).
        host: The address the workers reach each other at.
        environ: The environment the workers start from (default: `os.environ`).
        grace: Seconds the other workers get to stop after one failed; default
            `timeout + 30`.

    Returns:
        0 if every worker succeeded, else the exit status of the first that failed
        (1 if it was killed by a signal).
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(
            f"`num_processes` must be a positive int; received num_processes={num_processes!r}."
        )
    base = dict(os.environ if environ is None else environ)
    backend = _canonical(backend)
    ports = free_ports(_ports_needed(backend, num_processes), host)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(num_processes):
            env = {**base, **worker_environment(backend, index, num_processes, ports, host)}
            workers.append(subprocess.Popen(list(command), env=env))
        pids = ", ".join(f"{i}: {w.pid}" for i, w in enumerate(workers))
        _log.info("launched %d %s workers (pids %s)", num_processes, backend, pids)
        return _supervise(workers, grace=timeout + 30.0 if grace is None else grace)
    except KeyboardInterrupt:
        _stop(workers)
        return 130
    finally:
        _stop(workers)


def _supervise(workers: list[subprocess.Popen[bytes]], grace: float) -> int:
    failure: tuple[int, int] | None = None
    deadline: float | None = None
    while True:
        codes = [w.poll() for w in workers]
        if failure is None:
            for index, code in enumerate(codes):
                if code:
                    failure = (index, code)
                    deadline = time.monotonic() + grace
                    if any(c is None for c in codes):
                        print(
                            f"looproto: worker {index} exited with status {code}; waiting up "
                            f"to {grace:g} s for the other workers to stop",
                            file=sys.stderr,
                            flush=True,
                        )
                    break
        if all(code is not None for code in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            running = [i for i, code in enumerate(codes) if code is None]
            print(
                f"looproto: killing workers {running}, still running {grace:g} s after "
                "another worker failed",
                file=sys.stderr,
                flush=True,
            )
            _stop(workers)
            break
        time.sleep(0.05)
    if failure is None:
        return 0
    for index, worker in enumerate(workers):
        if worker.returncode:
            print(
                f"looproto: worker {index} exited with status {worker.returncode}",
                file=sys.stderr,
                flush=True,
            )
    return failure[1] if failure[1] > 0 else 1


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    # SIGKILL: JAX's and TensorFlow's runtimes catch SIGTERM (to sync preemptions).
    for worker in workers:
        if worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.wait(timeout=10)
