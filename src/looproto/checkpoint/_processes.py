"""Private: what the processes of a multi-process run agree on, for `looproto.checkpoint`.

Who calls orbax's save (every process under JAX, the chief alone under torch and
TensorFlow), the check that every process holds the same values before a save, the
chief's save outcome shared with the others, and the agreement on which checkpoint
to restore. See `looproto.distributed`.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from looproto import distributed
from looproto.errors import CheckpointError


def writes_checkpoints() -> bool:
    """Whether this process calls orbax's save.

    Under JAX every process does (orbax sees the processes and decides who writes
    what). Under torch and TensorFlow orbax cannot see the other processes, so only
    the chief writes; the others wait for it in `share_save_outcome`.
    """
    engine = distributed.engine()
    return engine is None or engine.collective_checkpoints or engine.process_index == 0


def check_replicas_agree(meta: dict[str, Any], step: int) -> None:
    """Every process holds the same values: a checkpoint keeps one copy of each."""
    values: dict[str, Any] = {path: spec["crc32"] for path, spec in meta["tree"].items()}
    objects = json.dumps(meta["objects"], sort_keys=True).encode()
    values["<object states>"] = zlib.crc32(objects)
    values["<step>"] = step
    distributed.check_same(
        values,
        f"the values of checkpoint {step} (CRC-32 of each array)",
        hint=(
            "A checkpoint holds one copy of every variable, so every process must hold the "
            "same values (data-parallel replicas); per-process state cannot be checkpointed. "
            "Nothing was written."
        ),
    )


def share_save_outcome(step: int, error: str | None) -> None:
    """Waits for the chief's save (torch, TensorFlow) and fails if it failed."""
    outcomes = distributed.all_gather(error, f"the end of checkpoint {step}")
    if not distributed.is_chief() and outcomes[0] is not None:
        raise CheckpointError(f"Process 0 failed to save checkpoint {step}: {outcomes[0]}")


def agree_on_restore(step: int | None) -> None:
    if distributed.process_count() > 1:
        chosen = -1 if step is None else step
        distributed.check_same(
            {"step": chosen},
            "which checkpoint to restore (-1: none)",
            hint="Every process must restore the same checkpoint; is the directory shared?",
        )
