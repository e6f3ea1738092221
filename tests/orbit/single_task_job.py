"""One job of Orbit's `single_task` example, imports renamed, on `looproto.orbit`.

`test_single_task.py` runs it in fresh processes, as a user would run a training
script twice: `python single_task_job.py EXAMPLES MODEL_DIR TRAIN_STEPS RESULT`.
EXAMPLES is the directory `suite.write_examples` wrote (Orbit's `single_task_trainer`
and `single_task_evaluator` with their imports renamed); the job trains on Iris (the
offline `tensorflow_datasets` stand-in) through `looproto.orbit.Controller` with a
`tf.train.CheckpointManager`, to TRAIN_STEPS, evaluating every 100 steps, and writes
what the test checks to RESULT (JSON): the global step and weights it started from
(after the Controller restored the latest checkpoint), and those it ended with.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def main(examples: str, model_dir: str, train_steps: int, result: str) -> None:
    sys.path.insert(0, str(HERE / "shims"))
    import tensorflow as tf
    import tensorflow_datasets as tfds
    import tf_keras

    from looproto import orbit

    package = types.ModuleType("looproto.orbit.examples")
    package.__path__ = [examples]
    sys.modules[package.__name__] = package
    from looproto.orbit.examples.single_task import single_task_evaluator, single_task_trainer

    tf_keras.utils.set_random_seed(7)
    iris = tfds.load("iris")
    train_ds = iris["train"].shuffle(150, seed=3).batch(32).repeat()
    eval_ds = iris["train"].batch(50)
    model = tf_keras.Sequential(
        [
            tf_keras.Input(shape=(4,), name="features"),
            tf_keras.layers.Dense(10, activation=tf.nn.relu),
            tf_keras.layers.Dense(3),
        ]
    )
    optimizer = tf_keras.optimizers.SGD(learning_rate=0.05)
    trainer = single_task_trainer.SingleTaskTrainer(
        train_ds,
        label_key="label",
        model=model,
        loss_fn=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy("train_accuracy")],
    )
    evaluator = single_task_evaluator.SingleTaskEvaluator(
        eval_ds,
        label_key="label",
        model=model,
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy("accuracy")],
    )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(
        checkpoint,
        f"{model_dir}/checkpoints",
        max_to_keep=5,
        step_counter=optimizer.iterations,
        checkpoint_interval=100,
    )
    controller = orbit.Controller(
        trainer=trainer,
        evaluator=evaluator,
        global_step=optimizer.iterations,
        steps_per_loop=50,
        checkpoint_manager=manager,
        summary_dir=f"{model_dir}/summaries/train",
        eval_summary_dir=f"{model_dir}/summaries/eval",
    )
    start_step = int(optimizer.iterations.numpy())
    start_weights = [w.numpy().tolist() for w in model.weights]
    output = controller.train_and_evaluate(
        train_steps=train_steps, eval_steps=-1, eval_interval=100
    )
    report: dict[str, Any] = {
        "start_step": start_step,
        "start_weights": start_weights,
        "end_step": int(optimizer.iterations.numpy()),
        "end_weights": [w.numpy().tolist() for w in model.weights],
        "eval": {k: float(v) for k, v in (output or {}).items()},
        "checkpoints": list(manager.checkpoints),
    }
    Path(result).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
