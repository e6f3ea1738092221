"""Multi-process scaling: samples/s of 1 vs 2 local processes on workload B, per engine.

Workload B (MLP 512->1024->1024->10, softmax cross-entropy, SGD) at a *global* batch of
256: with 2 processes each takes 128 rows of every global batch
(`ArrayDataset(shard=...)`, `distribute_dataset` on TensorFlow) and the engine averages
the gradients (torch: gloo + DistributedDataParallel; JAX: `jax.distributed` + one
global mesh; TensorFlow: `MultiWorkerMirroredStrategy`). Each configuration runs
`looproto`'s `StandardTrainer` in fresh worker processes launched by
`looproto.run.launch.launch`; the chief times `--steps` steps between two barriers,
after a warm-up loop (compilation, first collectives).

A 1-process and a 2-process run cannot share one process, so rounds alternate the two
(rotating which goes first) and the ratio is paired within a round, as `_timing` does.
Each process gets `cores // processes` threads, so both configurations use the same
cores. On a 2-core machine this measures the communication cost more than any speed-up:
2 processes have no more compute than 1.

    python benchmarks/bench_distributed.py [--smoke] [--json PATH] [--steps 30] [--rounds 3]
        [--only torch,jax,tensorflow]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _timing, _workloads

WORKLOAD = _workloads.B
BACKENDS = ("torch", "jax", "tensorflow")


# -- the worker (one process of one configuration) --------------------------------------


def _data() -> dict[str, np.ndarray[Any, Any]]:
    """16 global batches of workload B, as one array per input."""
    batches = WORKLOAD.batches(count=16)
    return {
        "x": np.concatenate([x for x, _ in batches]),
        "y": np.concatenate([y for _, y in batches]),
    }


def _torch_trainer(threads: int) -> Any:
    import torch

    import looproto
    from looproto import distributed
    from looproto.backends import torch as torch_backend
    from looproto.data import ArrayDataset

    torch.set_num_threads(threads)
    layers: list[Any] = []
    params = WORKLOAD.params()
    for i in range(len(WORKLOAD.sizes) - 1):
        linear = torch.nn.Linear(WORKLOAD.sizes[i], WORKLOAD.sizes[i + 1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[2 * i].T.copy()))
            linear.bias.copy_(torch.from_numpy(params[2 * i + 1]))
        layers += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    data = _data()
    data["y"] = data["y"].astype(np.int64)

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            dataset = ArrayDataset(data, WORKLOAD.batch, epochs=None, shard=distributed.shard())
            # Eager: the comparison is 1 vs 2 processes, and inductor would compile for
            # minutes on 2 cores.
            super().__init__(
                dataset,
                options=looproto.StandardTrainerOptions(
                    backend="torch", use_compiled_step=False, use_compiled_loop=False
                ),
            )
            self.model = torch_backend.data_parallel(model)
            self.optimizer = torch.optim.SGD(model.parameters(), lr=WORKLOAD.learning_rate)
            self.global_step = looproto.create_global_step()
            self.loss = looproto.Variable(np.float32(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)
            loss = torch.nn.functional.cross_entropy(self.model(batch["x"]), batch["y"])
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.loss.assign(loss.detach())
            self.global_step.assign_add(1)

        def train_loop_end(self) -> dict[str, Any]:
            return {"loss": self.loss.numpy()}

    return Trainer()


def _jax_trainer(threads: int) -> Any:
    import jax
    import jax.numpy as jnp

    import looproto
    from looproto import distributed
    from looproto.backends import jax as jax_backend
    from looproto.data import ArrayDataset

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            dataset = ArrayDataset(_data(), WORKLOAD.batch, epochs=None, shard=distributed.shard())
            super().__init__(dataset, options=looproto.StandardTrainerOptions(backend="jax"))
            self.global_step = looproto.create_global_step()
            self.params = [looproto.Variable(jnp.asarray(p)) for p in WORKLOAD.params()]
            self.loss = looproto.Variable(jnp.float32(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)

            def loss_fn() -> Any:
                h = batch["x"]
                for i in range(0, len(self.params), 2):
                    h = h @ self.params[i].value + self.params[i + 1].value
                    if i + 2 < len(self.params):
                        h = jax.nn.relu(h)
                logp = jax.nn.log_softmax(h)
                return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))

            loss, grads = jax_backend.value_and_grad(loss_fn, self)
            for i, param in enumerate(self.params):
                param.assign(param.value - WORKLOAD.learning_rate * grads[f"params/{i}"])
            self.loss.assign(loss)
            self.global_step.assign_add(1)

        def train_loop_end(self) -> dict[str, Any]:
            out: dict[str, Any] = jax_backend.BACKEND.to_host({"loss": self.loss.value})
            return out

    return Trainer()


def _tensorflow_trainer(threads: int) -> Any:
    import tensorflow as tf

    import looproto
    from looproto.backends import tensorflow as tf_backend

    replicated = tf.VariableAggregation.ONLY_FIRST_REPLICA
    data = _data()
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(WORKLOAD.batch).repeat()

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(tf_backend.distribute_dataset(dataset))
            self.global_step = tf.Variable(0, dtype=tf.int64, aggregation=replicated)
            self.params = [tf.Variable(p, aggregation=replicated) for p in WORKLOAD.params()]
            self.loss = tf.Variable(0.0, aggregation=replicated)

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)
            with tf.GradientTape() as tape:
                h = batch["x"]
                for i in range(0, len(self.params), 2):
                    h = h @ self.params[i] + self.params[i + 1]
                    if i + 2 < len(self.params):
                        h = tf.nn.relu(h)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=batch["y"], logits=h)
                )
            grads = tape.gradient(loss, self.params)
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                grads = replica.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
                loss = replica.all_reduce(tf.distribute.ReduceOp.MEAN, loss)
            for param, grad in zip(self.params, grads):
                param.assign_sub(WORKLOAD.learning_rate * grad)
            self.loss.assign(loss)
            self.global_step.assign_add(1)

        def train_loop_end(self) -> dict[str, Any]:
            return {"loss": self.loss.numpy()}

    return Trainer()


def worker(backend: str, steps: int, threads: int, out: str) -> None:
    """One process: start the engine (several processes), warm up, time `steps` steps."""
    # Thread pools, before each framework starts them.
    if backend == "jax":
        multi = "true" if threads > 1 else "false"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={multi}"
        )
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)

    from looproto import distributed

    if distributed.environment(backend) is not None:
        distributed.initialize(backend, timeout=120)
    build = {"torch": _torch_trainer, "jax": _jax_trainer, "tensorflow": _tensorflow_trainer}
    with distributed.scope():
        trainer = build[backend](threads)
    trainer.train(steps)  # Warm-up: compilation, the first collectives.
    distributed.barrier("timed loop start")
    start = time.perf_counter()
    output = trainer.train(steps)
    distributed.barrier("timed loop end")
    seconds = time.perf_counter() - start
    if distributed.is_chief():
        with open(out, "w") as f:
            json.dump({"seconds": seconds, "loss": float(np.asarray(output["loss"]))}, f)
    distributed.shutdown()


# -- the parent: launches the configurations, interleaved ------------------------------


def _run(backend: str, processes: int, steps: int, tmp: str) -> Callable[[], float]:
    from looproto.run import launch

    threads = max(1, (os.cpu_count() or 1) // processes)
    out = os.path.join(tmp, f"{backend}-{processes}.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", backend]
    command += ["--steps", str(steps), "--threads", str(threads), "--out", out]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(threads))

    def run() -> float:
        if processes == 1:
            code = subprocess.run(command, env=env, check=False).returncode
        else:
            code = launch.launch(
                command, backend=backend, num_processes=processes, timeout=120, environ=env
            )
        if code:
            raise RuntimeError(f"{backend} with {processes} processes failed (status {code})")
        with open(out) as f:
            return float(json.load(f)["seconds"])

    return run


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated backends")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.threads, args.out)
        return []
    steps, rounds = (2, 1) if args.smoke else (args.steps, args.rounds)
    wanted = args.only.split(",") if args.only else list(BACKENDS)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in wanted:
            if importlib.util.find_spec(backend) is None:
                print(f"{backend}: not installed, skipped")
                continue
            contenders = {
                f"{backend} 1 process": _run(backend, 1, steps, tmp),
                f"{backend} 2 processes": _run(backend, 2, steps, tmp),
            }
            times = _timing.interleaved(contenders, rounds=rounds, steps_per_call=steps)
            for row in _timing.summarize(WORKLOAD.title, times, f"{backend} 1 process"):
                row["samples_per_second"] = WORKLOAD.batch / (row["us_per_step"] * 1e-6)
                row["processes"] = 1 if row["system"].endswith("1 process") else 2
                rows.append(row)
    print(f"Workload {WORKLOAD.title}, global batch {WORKLOAD.batch}, {steps} timed steps a run\n")
    print("| backend | processes | samples/s (median) | spread (IQR %) | time ratio to 1 process |")
    print("|---|---|---|---|---|")
    for row in rows:
        backend = row["system"].split()[0]
        print(
            f"| {backend} | {row['processes']} | {row['samples_per_second']:.0f} | "
            f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
        )
    if args.json:
        _timing.dump(args.json, {"machine": _timing.machine(), "steps": steps, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
