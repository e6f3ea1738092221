"""How TensorFlow workers find each other: `TF_CONFIG` (framework-free).

`MultiWorkerMirroredStrategy` reads the cluster and this task from `TF_CONFIG`; a local
launch gives every worker a port of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from looproto.backends._common import check_place
from looproto.backends.base import WorkerEnvironment
from looproto.errors import ConfigError, value_repr

__all__ = ["LAUNCHER", "TensorflowLauncher"]


class TensorflowLauncher:
    """The `looproto.backends.Launcher` of the TensorFlow backend."""

    def environment(self, environ: Mapping[str, str]) -> WorkerEnvironment | None:
        """See `looproto.backends.Launcher`."""
        text = environ.get("TF_CONFIG")
        if not text:
            return None
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
                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                f'"index": 0}}}}; received {value_repr(text)} ({type(err).__name__}: {err}).'
            ) from None
        if task_type not in ("chief", "worker"):
            raise ConfigError(
                f"`TF_CONFIG` task type {task_type!r}: looproto runs "
                "`MultiWorkerMirroredStrategy` tasks of type 'chief' or 'worker'."
            )
        # MultiWorkerMirroredStrategy's numbering: the chief first, then the workers.
        index = task_index if task_type == "chief" else task_index + len(chiefs)
        count = len(chiefs) + len(workers)
        check_place(index, count, "`TF_CONFIG`")
        leader = (chiefs or workers)[0]
        return WorkerEnvironment(index, count, str(leader))

    def ports_needed(self, num_processes: int) -> int:
        """See `looproto.backends.Launcher`: one per worker (each task listens)."""
        return num_processes

    def worker_environment(
        self, process_index: int, num_processes: int, ports: Sequence[int], host: str
    ) -> dict[str, str]:
        """See `looproto.backends.Launcher`."""
        config = {
            "cluster": {"worker": [f"{host}:{port}" for port in ports[:num_processes]]},
            "task": {"type": "worker", "index": process_index},
        }
        return {"TF_CONFIG": json.dumps(config)}


LAUNCHER = TensorflowLauncher()
