"""`looproto.metrics` over two processes equal a hand computation over the global batches.

Two local workers per engine, each with its slice of every global batch
(`ArrayDataset(shard=distributed.shard())`), update the same metrics inside the
compiled loop. Under torch (DistributedDataParallel-style: each process sees its own
slice) `result()` merges the processes' states; under JAX (one global mesh: every
process computes on the whole batch) there is nothing to merge. Either way each process
must report the metrics of the global batches, as one process would.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from looproto.run import launch

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 4
STEPS = 3

WORKER = """
    import json, sys
    import numpy as np
    import looproto
    from looproto import distributed, metrics
    from looproto.data import ArrayDataset

    backend, out, batch_size, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    distributed.initialize(backend, timeout=60)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=24).astype(np.int64)
    options = {"torch": {"backend": "eager"}}.get(backend, {})

    class Trainer(looproto.StandardTrainer):
        def __init__(self):
            data = ArrayDataset({"x": x, "label": labels}, batch_size, shard=distributed.shard())
            super().__init__(
                data,
                options=looproto.StandardTrainerOptions(backend=backend, backend_options=options),
            )
            self.global_step = looproto.create_global_step()
            self.train_metrics = {
                "mean": metrics.Mean(), "sum": metrics.Sum(), "accuracy": metrics.Accuracy(),
                "low": metrics.Min(), "high": metrics.Max(), "last": metrics.Last(),
            }

        def train_step(self, iterator):
            batch = next(iterator)
            m = self.train_metrics
            m["mean"].update(batch["x"])
            m["sum"].update(batch["x"][:, 1])
            m["accuracy"].update(batch["label"], batch["x"])
            m["low"].update(batch["x"])
            m["high"].update(batch["x"])
            m["last"].update(batch["x"][0, 0])
            self.global_step.assign_add(1)

    output = Trainer().train(steps)
    with open(f"{out}/{distributed.process_index()}.json", "w") as f:
        json.dump({k: float(v) for k, v in output.items()}, f)
    distributed.shutdown()
"""


def _expected(backend: str) -> dict[str, float]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=24).astype(np.int64)
    rows = slice(0, GLOBAL_BATCH * STEPS)
    last_batch = x[GLOBAL_BATCH * (STEPS - 1) : GLOBAL_BATCH * STEPS]
    if backend == "torch":  # each process's own first row, averaged over the two
        last = float(np.mean([last_batch[0, 0], last_batch[GLOBAL_BATCH // 2, 0]]))
    else:  # the global batch's first row, the same on both
        last = float(last_batch[0, 0])
    return {
        "mean": float(x[rows].mean()),
        "sum": float(x[rows, 1].sum()),
        "accuracy": float((x[rows].argmax(-1) == labels[rows]).mean()),
        "low": float(x[rows].min()),
        "high": float(x[rows].max()),
        "last": last,
    }


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_two_processes_report_the_global_batches_metrics(backend: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    command = [sys.executable, "-c", textwrap.dedent(WORKER), backend, str(tmp_path)]
    command += [str(GLOBAL_BATCH), str(STEPS)]
    assert launch.launch(command, backend=backend, num_processes=2, timeout=60) == 0
    expected = _expected(backend)
    for index in (0, 1):
        got = json.loads((tmp_path / f"{index}.json").read_text())
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
