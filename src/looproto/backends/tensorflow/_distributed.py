"""Multi-worker training on `MultiWorkerMirroredStrategy`.

`initialize_distributed` creates (or adopts) the strategy of `TF_CONFIG` with
looproto's timeouts and wraps it in a `TensorflowEngine`, the
`looproto.distributed.Engine` of this backend; `distribute_dataset` splits a
dataset of global batches among the replicas; `engine_strategy` is how the loop
finds the engine's strategy, and `PEER_FAILURES` are the errors by which
TensorFlow's collectives report a lost peer. Not named `distributed` so that it is
never confused with `looproto.distributed`, which it builds on.
"""

from __future__ import annotations

import os
from typing import Any, Final

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.eager import context as tf_context

from looproto import distributed
from looproto.backends.tensorflow._launch import LAUNCHER
from looproto.errors import ConfigError, DistributedError

# How TensorFlow's collectives fail when a peer is gone (UNAVAILABLE: its heartbeats
# stopped) or silent (DEADLINE_EXCEEDED: the collective's timeout).
PEER_FAILURES: Final = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
)


def engine_strategy() -> tf.distribute.Strategy | None:
    """The strategy of the active looproto engine, when it is TensorFlow's."""
    engine = distributed.engine()
    return engine.strategy if isinstance(engine, TensorflowEngine) else None


class TensorflowEngine:
    """`looproto.distributed.Engine` on `MultiWorkerMirroredStrategy`.

    Made by `initialize_distributed`.

    Control messages use the key-value store of TensorFlow's coordination service,
    with the run's timeout. orbax does not see the workers, so the chief writes
    checkpoints (`collective_checkpoints` is False). `scope()` is the strategy's
    scope: variables made in it are mirrored on every worker.

    Attributes:
        strategy: The `tf.distribute.MultiWorkerMirroredStrategy`; the TensorFlow
            backend's loops run under it unless told otherwise.
    """

    backend = "tensorflow"
    collective_checkpoints = False

    def __init__(self, strategy: tf.distribute.Strategy, timeout: float) -> None:
        self.strategy = strategy
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec()
        self.process_index = int(
            multi_worker_util.id_in_cluster(spec, resolver.task_type, resolver.task_id)
        )
        self.process_count = int(
            sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
        )
        self.timeout = timeout

    def key_value_set(self, key: str, value: str) -> None:
        """See `looproto.distributed.Engine`."""
        tf_context.context().set_config_key_value(key, value)

    def key_value_get(self, key: str, timeout: float) -> str:
        """See `looproto.distributed.Engine`."""
        ms = max(int(timeout * 1000), 1)
        return str(tf_context.context().get_config_key_value(key, timeout_in_ms=ms))

    def key_value_delete(self, key: str) -> None:
        """See `looproto.distributed.Engine`."""
        tf_context.context().delete_config_key_value(key)

    def scope(self) -> Any:
        """See `looproto.distributed.Engine`: `strategy.scope()`."""
        return self.strategy.scope()

    def shutdown(self) -> None:
        """See `looproto.distributed.Engine`: TensorFlow leaves the cluster at exit."""

    def __repr__(self) -> str:
        return f"TensorflowEngine(worker {self.process_index} of {self.process_count})"


def initialize_distributed(timeout: float = distributed.DEFAULT_TIMEOUT) -> TensorflowEngine:
    """Creates the `MultiWorkerMirroredStrategy` of `TF_CONFIG`, for `distributed.initialize`.

    A `MultiWorkerMirroredStrategy` whose scope is active is adopted instead. Else
    the strategy is created here, so call this before TensorFlow runs any op. The
    coordination service is configured first with `timeout` for every worker to
    register and for the shutdown barrier; the strategy's collectives get the same
    timeout (`CommunicationOptions(timeout_seconds=...)`). A worker that dies is
    reported by the coordination service's heartbeats (10 s).

    Raises:
        ConfigError: `TF_CONFIG` is not set (and no strategy is active).
    """
    current = tf.distribute.get_strategy()
    if isinstance(current, tf.distribute.MultiWorkerMirroredStrategy):
        return TensorflowEngine(current, timeout)
    env = LAUNCHER.environment(os.environ)
    if env is None:
        raise ConfigError(
            "`TF_CONFIG` is not set: MultiWorkerMirroredStrategy reads the cluster and this "
            "worker's task from it. Launch with `looproto train CONFIG --num-processes N`, or "
            'set it: {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            '"index": i}}.'
        )
    context = tf_context.context()
    if context.coordination_service is None:
        # What the strategy would configure, plus timeouts: the default waits an hour
        # for a worker that never registers.
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = resolver.cluster_spec()
        jobs = [
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker")
            if job in spec.jobs
        ]
        ms = max(int(timeout * 1000), 1)
        context.configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            cluster_register_timeout_in_ms=ms,
            shutdown_barrier_timeout_in_ms=ms,
            coordinated_jobs=jobs,
        )
        # Without it the leader waits for absent workers forever (the timeout above
        # bounds only the other workers' registration).
        configured: Any = context.coordination_service
        configured.cluster_register_with_barrier = True
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (tf.errors.OpError, RuntimeError) as err:
        raise DistributedError(
            f"Worker {env.process_index} of {env.process_count} could not join the other "
            f"workers ({env.coordinator} leads) within {timeout:g} s: "
            f"{str(err).strip().splitlines()[0]}"
        ) from err
    return TensorflowEngine(strategy, timeout)


def distribute_dataset(dataset: tf.data.Dataset, strategy: Any = None) -> Any:
    """A dataset of *global* batches as `strategy`'s distributed dataset.

    Every worker runs the same pipeline (same order, same shuffling seed) and each
    replica takes its slice of every global batch: together the replicas see
    exactly the batches one process would, whatever the number of workers.

    Args:
        dataset: Batched with the global batch size, identically on every worker.
        strategy: Default: the active engine's strategy, else `tf.distribute.get_strategy()`.

    Returns:
        `dataset` itself under a one-replica strategy; else a distributed dataset
        (`strategy.distribute_datasets_from_function`).
    """
    strategy = strategy or engine_strategy() or tf.distribute.get_strategy()
    replicas = int(strategy.num_replicas_in_sync)
    if replicas == 1:
        return dataset

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        workers = context.num_input_pipelines
        local = replicas // workers
        first = context.input_pipeline_id * local

        def replica_slices(*batch: Any) -> Any:
            def cut(t: tf.Tensor) -> tf.Tensor:
                n = tf.shape(t)[0]
                rows = [t[n * (first + r) // replicas : n * (first + r + 1) // replicas]
                        for r in range(local)]  # fmt: skip
                return tf.stack(rows) if local > 1 else rows[0][tf.newaxis]

            cut_batch = tf.nest.map_structure(cut, batch)
            return tf.data.Dataset.from_tensor_slices(cut_batch)

        sliced = dataset.flat_map(replica_slices)
        return sliced.map(lambda *b: b[0] if len(b) == 1 else b)

    return strategy.distribute_datasets_from_function(per_worker)
