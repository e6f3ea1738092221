"""The local launcher behind `looproto train --num-processes N`.

`launch` starts `N` copies of a command on this machine, each with the environment
its backend's engine reads to find the others (`worker_environment`, from the
backend's `looproto.backends.Launcher`: torchrun's variables, `TF_CONFIG`, JAX's
coordinator), and supervises them: when one fails, the others get a grace period to
notice their lost peer, and are then killed. No framework is imported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from looproto import backends, distributed
from looproto._validate import positive_int
from looproto.backends.base import Launcher
from looproto.errors import ConfigError

__all__ = ["free_ports", "launch", "worker_environment"]

_log = logging.getLogger("looproto")


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
        backend: The backend's name (`"torch"`, `"jax"`, `"tensorflow"`, ...).
        process_index: The worker's index.
        num_processes: How many workers there are.
        ports: Free ports: as many as the backend's launcher needs (one for torch and
            JAX, one per worker for TensorFlow).
        host: The address the workers reach each other at.

    Raises:
        ConfigError: The backend has no distributed engine, or too few ports.
    """
    name, launcher = _launcher(backend)
    needed = launcher.ports_needed(num_processes)
    if len(ports) < needed:
        raise ConfigError(
            f"A {name} launch of {num_processes} processes needs {needed} port(s); "
            f"received {list(ports)}."
        )
    return launcher.worker_environment(process_index, num_processes, ports, host)


def _launcher(backend: str) -> tuple[str, Launcher]:
    name = backends.canonical_name(backend)
    launcher = backends.launcher(name)
    if launcher is None:
        raise ConfigError(
            f"The {name!r} backend has no distributed engine; multi-process training "
            f"runs on {distributed.engines()}."
        )
    return name, launcher


def launch(
    command: Sequence[str],
    *,
    backend: str,
    num_processes: int,
    timeout: float = distributed.DEFAULT_TIMEOUT,
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
    positive_int(num_processes, "num_processes")
    base = dict(os.environ if environ is None else environ)
    backend, launcher = _launcher(backend)
    ports = free_ports(launcher.ports_needed(num_processes), host)
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
