"""What every example shares: the outer loop it builds, and its command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import looproto
from looproto.module import read_int


def controller(
    model_dir: str,
    trainer: Any,
    evaluator: Any,
    *,
    steps_per_loop: int,
    checkpoint_interval: int,
) -> looproto.Controller:
    """The examples' outer loop: checkpoints (3 kept) and train/eval summaries under `model_dir`."""
    checkpoints = looproto.CheckpointManager(
        os.path.join(model_dir, "checkpoints"),
        trainer,
        max_to_keep=3,
        checkpoint_interval=checkpoint_interval,
        step_counter=trainer.global_step,
    )
    return looproto.Controller(
        trainer=trainer,
        evaluator=evaluator,
        global_step=trainer.global_step,
        steps_per_loop=steps_per_loop,
        checkpoint_manager=checkpoints,
        summary_dir=os.path.join(model_dir, "summaries", "train"),
        eval_summary_dir=os.path.join(model_dir, "summaries", "eval"),
    )


def run(
    name: str,
    description: str,
    make_controller: Callable[..., tuple[looproto.Controller, Any]],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    controller_kwargs: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
) -> int:
    """Parses `argv`, trains and evaluates, and prints where the loss curve ended.

    Args:
        name: The example's name; the default model directory is `runs/<name>`.
        description: The first line of `--help`.
        make_controller: `make_controller(model_dir, steps_per_loop=..., **kwargs)`
            returning `(controller, trainer)`; the trainer has a `global_step`.
        argv: Arguments (default: `sys.argv[1:]`).
        add_arguments: Adds the example's own flags to the parser.
        controller_kwargs: Maps the parsed flags to more `make_controller` arguments.
    """
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--model-dir", default=os.path.join("runs", name))
    parser.add_argument("--steps", type=int, default=2000, help="global step to train to")
    parser.add_argument("--steps-per-loop", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=500)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    # looproto's progress lines at INFO; orbax/absl chatter only when it is a warning.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    looproto.enable_logging(logging.WARNING if args.quiet else logging.INFO)
    extra = controller_kwargs(args) if controller_kwargs is not None else {}
    controller, trainer = make_controller(
        args.model_dir, steps_per_loop=args.steps_per_loop, **extra
    )
    start = read_int(trainer.global_step)
    with controller:
        output = controller.train_and_evaluate(
            train_steps=args.steps, eval_steps=-1, eval_interval=args.eval_interval
        )
    if output is None:
        print(f"Already trained to step {start}; pass a larger --steps to continue.")
    else:
        print(
            f"Trained steps {start} -> {read_int(trainer.global_step)}; "
            f"eval_loss {float(np.asarray(output['eval_loss'])):.4f}. "
            f"TensorBoard: tensorboard --logdir {os.path.join(args.model_dir, 'summaries')}"
        )
    return 0
