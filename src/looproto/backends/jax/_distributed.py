"""Multi-process training on `jax.distributed`: `JaxEngine` and `initialize_distributed`.

`initialize_distributed` starts (or adopts) JAX's runtime for
`looproto.distributed.initialize("jax")`; `JaxEngine` is the `looproto.distributed.Engine`
over its coordination service. `is_peer_failure` tells the compiled loop when an
error is a dead peer rather than a bug in the step. Only multi-process runs use this.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax

from looproto import distributed
from looproto.backends.jax._launch import LAUNCHER
from looproto.errors import ConfigError, DistributedError, LooprotoError

# ----------------------------------------------------------------------------
# Multi-process: jax.distributed.

# What gloo (CPU) and the coordination service say when a peer process is gone.
_PEER_FAILURE_MARKERS = (
    "Gloo",
    "gloo",
    "NCCL",
    "Connection reset by peer",
    "Connection closed by peer",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


_HEARTBEAT_MARGIN = 10  # seconds


def is_peer_failure(err: BaseException) -> bool:
    """A runtime error of a cross-process collective (not a bug in the step)."""
    if not isinstance(err, (ValueError, RuntimeError, jax.errors.JaxRuntimeError)):
        return False
    if isinstance(err, LooprotoError):
        return False
    text = str(err)
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


def _distributed_client() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


class JaxEngine:
    """`looproto.distributed.Engine` on `jax.distributed` (see `initialize_distributed`).

    Control messages use the key-value store of JAX's coordination service (run by
    process 0), with timeouts; orbax sees the processes (`collective_checkpoints`).
    """

    backend = "jax"
    collective_checkpoints = True

    def __init__(self, timeout: float, owns_runtime: bool) -> None:
        self.process_index = int(jax.process_index())
        self.process_count = int(jax.process_count())
        self.timeout = timeout
        self._owns_runtime = owns_runtime
        self._client = _distributed_client()

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._client.key_value_set(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        return str(self._client.blocking_key_value_get(key, max(int(timeout * 1000), 1)))

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        self._client.key_value_delete(key)

    def values_are_global(self) -> bool:
        """See `looproto.backends.SupportsGlobalValues`: steps run on one global mesh."""
        return True

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """See `looproto.distributed.Engine`: nothing to enter."""
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: shuts down the runtime looproto started."""
        if self._owns_runtime and jax.distributed.is_initialized():
            jax.distributed.shutdown()

    def __repr__(self) -> str:
        return f"JaxEngine(process {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> JaxEngine:
    """Starts `jax.distributed` (or adopts it) for `looproto.distributed.initialize`.

    The coordinator, the number of processes and this process's id come from
    `LOOPROTO_COORDINATOR_ADDRESS`, `LOOPROTO_NUM_PROCESSES` and `LOOPROTO_PROCESS_ID`
    (what `looproto train --num-processes` sets), else from JAX's own cluster
    detection (SLURM, Open MPI, Cloud TPU, ...). `timeout` bounds the wait for every
    process to join and the shutdown barrier; a process whose heartbeats stop counts
    as dead 10 s after that (then JAX itself ends the others). CPU collectives use
    gloo (JAX's default).

    Raises:
        ConfigError: JAX already computed something in this process (the runtime
            must start first), or nothing says where the processes are.
        DistributedError: The processes did not all join within `timeout`.
    """
    if jax.distributed.is_initialized():
        return JaxEngine(timeout, owns_runtime=False)
    env = LAUNCHER.environment(os.environ)
    seconds = max(math.ceil(timeout), 1)
    kwargs: dict[str, Any] = {
        "initialization_timeout": seconds,
        # Later than looproto's own waits (`timeout`): when the coordination service
        # declares a process dead, JAX aborts every other process (its message, not ours).
        "heartbeat_timeout_seconds": seconds + _HEARTBEAT_MARGIN,
        "shutdown_timeout_seconds": seconds,
    }
    if env is not None:
        kwargs.update(
            coordinator_address=env.coordinator,
            num_processes=env.process_count,
            process_id=env.process_index,
        )
    where = env.coordinator if env is not None else "the address JAX's cluster detection found"
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        if "before" in str(err) and "computation" in str(err).lower():
            raise ConfigError(
                "`jax.distributed` must start before JAX computes anything in this process: "
                "call `looproto.distributed.initialize('jax')` first (before building the "
                f"trainer). JAX said: {str(err).splitlines()[0]}"
            ) from err
        raise DistributedError(
            f"JAX process {'?' if env is None else env.process_index} could not join the "
            f"other processes at {where} within {timeout:g} s: {str(err).splitlines()[0]}"
        ) from err
    except ValueError as err:
        if env is None:
            raise ConfigError(
                "Cannot tell where the JAX processes are: set `LOOPROTO_COORDINATOR_ADDRESS`, "
                "`LOOPROTO_NUM_PROCESSES` and `LOOPROTO_PROCESS_ID` (`looproto train "
                "--num-processes N` does), or run under a cluster JAX detects. JAX said: "
                f"{str(err).splitlines()[0]}"
            ) from err
        raise
    return JaxEngine(timeout, owns_runtime=True)
