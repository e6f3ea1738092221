"""Checkpoints: looproto's `CheckpointManager` against plain orbax, 100 MB of state.

Both sides write the same 25 float32 arrays of 1 M elements (100 MB) with orbax's
`CheckpointManager` into fresh step directories, synchronously, and read them back.
looproto adds what plain orbax lacks: a CRC-32 and the expected shape/dtype of every
array in a JSON item, the comparison of the stored tree with the live one, and the
verification of every array before any variable is written.

    python benchmarks/bench_checkpoint.py [--smoke] [--json PATH] [--megabytes N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import looproto
from benchmarks import _timing


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="1 MB, 2 rounds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    megabytes = 1 if args.smoke else args.megabytes
    rounds = args.rounds or (2 if args.smoke else 8)
    import orbax.checkpoint as ocp

    n_arrays = 25
    size = megabytes * 2**20 // 4 // n_arrays
    rng = np.random.default_rng(0)
    arrays = {f"layer_{i:02d}/w": rng.standard_normal(size).astype(np.float32) for i in range(25)}
    variables = {key: looproto.Variable(value) for key, value in arrays.items()}
    root = tempfile.mkdtemp(prefix="bench_checkpoint_")
    counter = {"plain": 0, "looproto": 0}
    try:
        plain = ocp.CheckpointManager(
            os.path.join(root, "plain"),
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=2),
        )
        managed = looproto.CheckpointManager(
            os.path.join(root, "looproto"), variables, max_to_keep=2
        )

        def plain_save() -> None:
            counter["plain"] += 1
            plain.save(counter["plain"], args=ocp.args.StandardSave(arrays))
            plain.wait_until_finished()

        def looproto_save() -> None:
            counter["looproto"] += 1
            managed.save(checkpoint_number=counter["looproto"])

        def plain_restore() -> None:
            restored = plain.restore(counter["plain"], args=ocp.args.StandardRestore())
            assert restored["layer_00/w"].shape == (size,)

        def looproto_restore() -> None:
            managed.restore(counter["looproto"])

        saves = _timing.interleaved(
            {"orbax save": plain_save, "looproto save": looproto_save}, rounds, 1
        )
        restores = _timing.interleaved(
            {"orbax restore": plain_restore, "looproto restore": looproto_restore}, rounds, 1
        )
        plain.close()
        managed.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    title = f"{megabytes} MB state"
    rows = _timing.summarize(title, saves, baseline="orbax save")
    rows += _timing.summarize(title, restores, baseline="orbax restore")
    for row in rows:  # µs per call -> ms, which is what a checkpoint is measured in
        row["ms"] = row["us_per_step"] / 1000
    print("| workload | system | ms (median) | spread (IQR %) | ratio to plain orbax |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workload']} | {row['system']} | {row['ms']:.1f} | "
            f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
        )
    if args.json:
        _timing.dump(args.json, {"machine": _timing.machine(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
