"""How JAX workers find each other: looproto's coordinator variables (framework-free).

JAX itself reads only `JAX_COORDINATOR_ADDRESS` (and detects clusters such as SLURM or
Cloud TPU); `looproto train --num-processes` gives each worker
`LOOPROTO_COORDINATOR_ADDRESS`, `LOOPROTO_NUM_PROCESSES` and `LOOPROTO_PROCESS_ID`,
which `initialize_distributed` passes to `jax.distributed.initialize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from looproto.backends._common import check_place, env_int
from looproto.backends.base import WorkerEnvironment
from looproto.errors import ConfigError

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "LAUNCHER", "JaxLauncher"]

ENV_COORDINATOR: Final = "LOOPROTO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES: Final = "LOOPROTO_NUM_PROCESSES"
ENV_PROCESS_ID: Final = "LOOPROTO_PROCESS_ID"


class JaxLauncher:
    """The `looproto.backends.Launcher` of the JAX backend."""

    def environment(self, environ: Mapping[str, str]) -> WorkerEnvironment | None:
        """See `looproto.backends.Launcher`."""
        if ENV_NUM_PROCESSES not in environ:
            return None
        index, count = env_int(environ, ENV_PROCESS_ID), env_int(environ, ENV_NUM_PROCESSES)
        check_place(index, count, f"`{ENV_PROCESS_ID}`/`{ENV_NUM_PROCESSES}`")
        coordinator = environ.get(ENV_COORDINATOR) or environ.get("JAX_COORDINATOR_ADDRESS")
        if not coordinator:
            raise ConfigError(
                f"`{ENV_NUM_PROCESSES}` is set but `{ENV_COORDINATOR}` is not; set it to the "
                "`host:port` process 0 listens on."
            )
        return WorkerEnvironment(index, count, coordinator)

    def ports_needed(self, num_processes: int) -> int:
        """See `looproto.backends.Launcher`: one, the coordinator's."""
        return 1

    def worker_environment(
        self, process_index: int, num_processes: int, ports: Sequence[int], host: str
    ) -> dict[str, str]:
        """See `looproto.backends.Launcher`."""
        return {
            ENV_COORDINATOR: f"{host}:{ports[0]}",
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_index),
        }


LAUNCHER = JaxLauncher()
