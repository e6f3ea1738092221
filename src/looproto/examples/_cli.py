"""The command line every example shares: train and evaluate to `--steps`, resuming."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import looproto
from looproto.module import variable_to_numpy


def run(
    name: str,
    description: str,
    make_controller: Callable[..., tuple[looproto.Controller, Any]],
    argv: list[str] | None = None,
) -> int:
    """Parses `argv`, trains and evaluates, and prints where the loss curve ended.

    Args:
        name: The example's name; the default model directory is `runs/<name>`.
        description: The first line of `--help`.
        make_controller: `make_controller(model_dir, steps_per_loop=...)` returning
            `(controller, trainer)`; the trainer has a `global_step`.
        argv: Arguments (default: `sys.argv[1:]`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", default=os.path.join("runs", name))
    parser.add_argument("--steps", type=int, default=2000, help="global step to train to")
    parser.add_argument("--steps-per-loop", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=500)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    # looproto's progress lines at INFO; orbax/absl chatter only when it is a warning.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("looproto").setLevel(logging.WARNING if args.quiet else logging.INFO)
    controller, trainer = make_controller(args.model_dir, steps_per_loop=args.steps_per_loop)
    start = int(variable_to_numpy(trainer.global_step))
    with controller:
        output = controller.train_and_evaluate(
            train_steps=args.steps, eval_steps=-1, eval_interval=args.eval_interval
        )
    if output is None:
        print(f"Already trained to step {start}; pass a larger --steps to continue.")
    else:
        print(
            f"Trained steps {start} -> {int(variable_to_numpy(trainer.global_step))}; "
            f"eval_loss {float(np.asarray(output['eval_loss'])):.4f}. "
            f"TensorBoard: tensorboard --logdir {os.path.join(args.model_dir, 'summaries')}"
        )
    return 0
