"""How torch workers find each other: `torchrun`'s environment (framework-free).

`RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, as `torchrun` sets them and
`torch.distributed`'s `env://` initialisation reads them; a local launch sets what
`torchrun --nproc-per-node=N` sets on one node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from looproto.backends._common import check_place, env_int
from looproto.backends.base import WorkerEnvironment

__all__ = ["LAUNCHER", "TorchLauncher"]


class TorchLauncher:
    """The `looproto.backends.Launcher` of the torch backend."""

    def environment(self, environ: Mapping[str, str]) -> WorkerEnvironment | None:
        """See `looproto.backends.Launcher`."""
        if "WORLD_SIZE" not in environ:
            return None
        index, count = env_int(environ, "RANK"), env_int(environ, "WORLD_SIZE")
        check_place(index, count, "`RANK`/`WORLD_SIZE`")
        host, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
        return WorkerEnvironment(index, count, f"{host}:{port}" if host and port else None)

    def ports_needed(self, num_processes: int) -> int:
        """See `looproto.backends.Launcher`: one, the rendezvous store's."""
        return 1

    def worker_environment(
        self, process_index: int, num_processes: int, ports: Sequence[int], host: str
    ) -> dict[str, str]:
        """See `looproto.backends.Launcher`."""
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


LAUNCHER = TorchLauncher()
