"""The JAX backend's `backend_options`: what each means, and parsing them.

`BACKEND_OPTIONS` documents each option (it is public, and the set of accepted keys);
`parse_backend_options` validates a `backend_options` mapping and resolves defaults
(a mesh over every device when several processes run) into `JaxLoop`'s arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from looproto.errors import ConfigError, value_repr

# The default `pipeline_chunks`: on an accelerator the host's pulling overlaps the
# device; on a CPU both share the cores, and `benchmarks/bench_jax.py` on 2 cores saw
# +-8% (a gain when a core is idle, a loss under load), so there it stays one call.
PIPELINE_CHUNKS = {"cpu": 1, "accelerator": 4}

BACKEND_OPTIONS: dict[str, str] = {
    "data": '"stack" (default): pull and stack batches on the host each loop; "device": '
    "keep an `ArrayDataset` on device and send only batch indices",
    "mesh": 'a `jax.sharding.Mesh` or "auto" (all visible devices): data-parallel, batch '
    'dimension sharded, state replicated (default: none in one process, "auto" over '
    "several, `jax.distributed`)",
    "data_axis": "the mesh axis the batch dimension is sharded over (default: its first)",
    "donate": "donate the state buffers to the compiled call (default True)",
    "chunk_size": "steps per compiled call when `num_steps=-1` (default 100)",
    "pipeline_chunks": 'with `data="stack"`: split each loop into up to this many equal compiled '
    "calls (of 8 steps or more), pulling and copying the next one's batches while the device "
    "runs the last (default 4 on an accelerator, 1 on CPU: one call per loop, no overlap)",
}


def parse_backend_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown JAX `backend_options` {unknown}; expected some of {sorted(BACKEND_OPTIONS)}."
        )
    data = options.get("data", "stack")
    if data not in ("stack", "device"):
        raise ConfigError(
            f'`backend_options["data"]` must be "stack" or "device"; received {data!r}.'
        )
    mesh = options.get("mesh")
    if mesh is None and jax.process_count() > 1:
        # Several processes: data parallel over all of them, else each would train alone.
        mesh = "auto"
    if isinstance(mesh, str) and mesh == "auto":
        mesh = Mesh(np.array(jax.devices()), ("data",))
    elif mesh is not None and not isinstance(mesh, Mesh):
        raise ConfigError(
            f'`backend_options["mesh"]` must be a `jax.sharding.Mesh` or "auto"; received '
            f"{value_repr(mesh)}."
        )
    data_axis = options.get("data_axis")
    if mesh is not None:
        data_axis = mesh.axis_names[0] if data_axis is None else data_axis
        if data_axis not in mesh.axis_names:
            raise ConfigError(
                f'`backend_options["data_axis"]` {data_axis!r} is not an axis of the mesh '
                f"{tuple(mesh.axis_names)}."
            )
    donate = options.get("donate", True)
    if not isinstance(donate, bool):
        raise ConfigError(f'`backend_options["donate"]` must be a bool; received {donate!r}.')
    chunk = options.get("chunk_size", 100)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(
            f'`backend_options["chunk_size"]` must be a positive int; received {chunk!r}.'
        )
    devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
    on_cpu = all(device.platform == "cpu" for device in devices)
    pipeline = options.get("pipeline_chunks", PIPELINE_CHUNKS["cpu" if on_cpu else "accelerator"])
    if isinstance(pipeline, bool) or not isinstance(pipeline, int) or pipeline < 1:
        raise ConfigError(
            f'`backend_options["pipeline_chunks"]` must be a positive int; received {pipeline!r}.'
        )
    return {
        "data": data,
        "mesh": mesh,
        "data_axis": data_axis,
        "donate": donate,
        "chunk_size": chunk,
        "pipeline_chunks": pipeline,
    }
