"""The `looproto` command: train and evaluate from a run config, list backends, inspect checkpoints.

    looproto train CONFIG [--num-processes N] [--set KEY=VALUE ...]
    looproto evaluate CONFIG [--continuous] [--timeout SECONDS] [--set KEY=VALUE ...]
    looproto backends
    looproto inspect CHECKPOINT_DIR [--step N] [--json]

(`python -m looproto ...` is the same.) See `looproto.run.config` for the config file.

Every fault prints one line, `looproto: error: ...`, and exits with its own status;
`--debug` shows the traceback instead. Exit statuses:

* 0 done;
* 2 a bad config, argument, or factory (what the user wrote is wrong);
* 3 a lost peer in a multi-process run;
* 4 storage or environment: a model directory that cannot be written (read-only, a
  file, a dangling symbolic link), a full disk, or a checkpoint directory another
  live process owns (`looproto.StorageError`, and any other `OSError`);
* 5 training diverged: an output or a variable became NaN or infinite
  (`looproto.NonFiniteError`); the last good checkpoint is kept;
* 75 preempted: run the same command again to resume;
* 130 interrupted by Ctrl-C outside training (start-up of `evaluate`, say), or 128 +
  N when a second signal N ends a run at once.

What can be checked before anything trains is: the config, the factories and what
they return, and whether the model directory and its `checkpoints/` and `summaries/`
can be written.

`looproto train` stops cleanly on SIGTERM or SIGINT (Ctrl-C), from its start: during
start-up it stops before training (nothing is written), during training the running
inner loop finishes and a checkpoint is saved; either way it exits with status 75
(`looproto.preemption.EXIT_PREEMPTED`) and running it again resumes. A second signal
ends it at once (status 128 + the signal number, e.g. 143 or 130).

`looproto evaluate` only reads the checkpoint directory (its checkpoint manager is
`read_only`): it can run beside `looproto train` on the same `model_dir`.

Multi-process training: `looproto train CONFIG --num-processes N` (or
`[distributed] num_processes = N`) spawns N local workers of the config's backend
with the environment its engine reads (`torchrun`'s for torch, a coordinator
address for JAX, `TF_CONFIG` for TensorFlow), on free ports. Run by a launcher that
sets that environment itself (`torchrun --nproc-per-node=N -m looproto train CONFIG`),
`looproto train CONFIG` is one worker. A worker whose peers died or stopped
responding prints `looproto: error: Process i of N: ...` and exits with status 3
at once (a clean shutdown would wait for the dead peer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import numpy as np

from looproto import backends, distributed, preemption
from looproto._logging import enable_logging
from looproto.errors import ConfigError, LooprotoError
from looproto.preemption import EXIT_PREEMPTED, Preempted
from looproto.run import launch
from looproto.run.config import RunConfig, call_factory, load
from looproto.run.faults import EXIT_DISTRIBUTED as EXIT_DISTRIBUTED
from looproto.run.faults import EXIT_DIVERGED as EXIT_DIVERGED
from looproto.run.faults import (
    EXIT_INTERRUPTED,
    StoppedInStartUp,
    check_built,
    check_model_dir,
    exit_status,
    one_line,
    quiet_background_tracebacks,
)
from looproto.run.faults import EXIT_STORAGE as EXIT_STORAGE
from looproto.run.faults import EXIT_USAGE as EXIT_USAGE

__all__ = ["build", "main"]

_log = logging.getLogger("looproto")


def _global_step(obj: Any, what: str, config: RunConfig) -> Any:
    step = getattr(obj, "global_step", None)
    if step is None:
        raise ConfigError(
            f"{config.source}: the {what} built by `{what}.factory` has no `global_step` "
            "attribute; the Controller counts steps with it (e.g. "
            "`self.global_step = looproto.create_global_step()`)."
        )
    return step


def build(config: RunConfig, *, train: bool = True, actions: Sequence[Any] = ()) -> Any:
    """Builds the trainer, evaluator, checkpoint manager and `Controller` of `config`.

    Args:
        config: The run config.
        train: Build for training (a trainer is required) or for evaluation only
            (the trainer is still built when configured, so that its checkpoint,
            which holds its whole state, restores).
        actions: Train actions to add (a progress bar, say).

    Returns:
        The `Controller` (restored from the newest checkpoint, if there is one).
    """
    from looproto.actions import EarlyStopping
    from looproto.checkpoint import CheckpointManager
    from looproto.controller import Controller

    if train and (config.trainer is None or config.train is None):
        missing = "[trainer]" if config.trainer is None else "[train]"
        raise ConfigError(f"{config.source}: `looproto train` needs a `{missing}` table.")
    if not train and config.evaluator is None:
        raise ConfigError(f"{config.source}: `looproto evaluate` needs an `[evaluator]` table.")
    trainer = None
    if config.trainer is not None:
        trainer = call_factory(config.trainer, config, "trainer")
        check_built(trainer, "trainer", "train", config)
    evaluator = None
    if config.evaluator is not None:
        evaluator = call_factory(config.evaluator, config, "evaluator", trainer=trainer)
        check_built(evaluator, "evaluator", "evaluate", config)
    if trainer is not None:
        global_step = _global_step(trainer, "trainer", config)
    else:
        global_step = _global_step(evaluator, "evaluator", config)
    run = config.train
    check_finite = train and run is not None and run.check_finite
    checkpoints = None
    if config.checkpoint.enabled:
        checkpoints = CheckpointManager(
            config.checkpoint_dir,
            trainer if trainer is not None else evaluator,
            max_to_keep=config.checkpoint.max_to_keep,
            checkpoint_interval=config.checkpoint.interval,
            step_counter=global_step,
            enable_async=config.checkpoint.async_save,
            best_fn=config.checkpoint.best_metric,
            best_mode=config.checkpoint.best_mode,
            keep_best=config.checkpoint.keep_best,
            # An evaluation never changes the directory: it may run beside training.
            read_only=not train,
            check_finite=check_finite,
        )
    try:
        eval_actions = []
        early = config.early_stopping
        if train and early is not None:
            eval_actions.append(
                EarlyStopping(
                    early.metric,
                    mode=early.mode,
                    patience=early.patience,
                    min_delta=early.min_delta,
                    filename=os.path.join(config.model_dir, "early_stopping.json"),
                )
            )
        return Controller(
            trainer=trainer if train else None,
            evaluator=evaluator,
            # Restores run in the engine's scope (a TensorFlow strategy's) when there is one.
            strategy=distributed.engine(),
            global_step=global_step,
            steps_per_loop=run.steps_per_loop if train and run is not None else None,
            checkpoint_manager=checkpoints,
            summary_interval=run.summary_interval if train and run is not None else None,
            summary_dir=os.path.join(config.summary_dir, "train"),
            eval_summary_dir=os.path.join(config.summary_dir, "eval"),
            train_actions=actions,
            eval_actions=eval_actions,
            check_finite=check_finite,
        )
    except BaseException:
        if checkpoints is not None:
            checkpoints.close()  # its lock, and orbax's threads, go with the error
        raise


@contextlib.contextmanager
def _progress(controller: Any, total: int, enabled: bool) -> Iterator[Any]:
    """A live bar on a terminal (with log records printed above it), else nothing."""
    from looproto.run import progress

    if not (enabled and sys.stderr.isatty() and progress.available()):
        yield None
        return
    from rich.logging import RichHandler

    bar = progress.Progress(controller.global_step, total)
    handler = RichHandler(console=bar.console, show_path=False, show_time=False)
    root = logging.getLogger()
    old = root.handlers[:]
    root.handlers = [handler]
    # The bar shows what the per-loop train lines would; keep the rest (eval, saves).
    per_loop = _DropPerLoopTrainLines()
    handler.addFilter(per_loop)
    try:
        yield bar
    finally:
        bar.close()
        root.handlers = old


class _DropPerLoopTrainLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("train | step: %6d | steps/sec")


def _train(args: argparse.Namespace) -> int:
    # A launcher only spawns workers: it need not import the framework.
    config = load(args.config, args.set, import_backend=False)
    backend = config.backend_name()
    worker = distributed.environment(backend)
    wanted = args.num_processes if args.num_processes is not None else None
    if wanted is not None and wanted < 1:
        raise ConfigError(f"`--num-processes` must be a positive integer; received {wanted}.")
    if worker is not None:
        if wanted is not None and wanted != worker.process_count:
            raise ConfigError(
                f"`--num-processes {wanted}`, but this process was launched as one of "
                f"{worker.process_count} (its environment says so); drop `--num-processes`."
            )
        return _train_worker(args)
    _check_not_foreign_launch(backend, config)
    count = wanted if wanted is not None else config.distributed.num_processes
    if count > 1:
        return _launch(args, config, backend, count)
    # From here on a signal is a request to stop, in start-up too (see `_train_here`).
    with preemption.watch():
        return _train_here(args, load(args.config, args.set))


def _check_not_foreign_launch(backend: str, config: RunConfig) -> None:
    torchrun = distributed.environment("torch")
    if torchrun is not None and torchrun.process_count > 1:
        raise ConfigError(
            f"{config.source}: this process was launched as one of {torchrun.process_count} "
            f"torch workers (`WORLD_SIZE`), but the backend is {backend!r}, which does not run "
            "on torch.distributed. Use `looproto train CONFIG --num-processes N` instead."
        )


def _launch(args: argparse.Namespace, config: RunConfig, backend: str, count: int) -> int:
    command = [sys.executable, "-m", "looproto"]
    if args.debug:
        command.append("--debug")
    command += ["train", args.config, "--no-progress"]
    command += [f"--set={item}" for item in args.set]
    return launch.launch(
        command, backend=backend, num_processes=count, timeout=config.distributed.timeout
    )


def _train_worker(args: argparse.Namespace) -> int:
    """One process of a multi-process run; never waits on a dead peer to exit."""
    try:
        with preemption.watch():
            config = load(args.config, args.set)
            distributed.initialize(config.backend_name(), timeout=config.distributed.timeout)
            if not distributed.is_chief():  # One copy of the progress log: the chief's.
                logging.getLogger("looproto").setLevel(logging.WARNING)
            code = _train_here(args, config)
        distributed.shutdown()
        return code
    except Preempted as stop:  # the checkpoint is on disk (the Controller waited)
        _exit_now(f"looproto: {stop}", EXIT_PREEMPTED, args)
    except KeyboardInterrupt:
        _exit_now("looproto: interrupted", EXIT_INTERRUPTED, args)
    except Exception as err:
        status = exit_status(err)
        if status is None:
            traceback.print_exc()
            _exit_now("looproto: error: the worker failed (traceback above)", 1, args)
        _exit_now(f"looproto: error: {one_line(err)}", status, args)


def _exit_now(message: str, code: int, args: argparse.Namespace) -> NoReturn:
    # The frameworks' exit handlers (JAX's shutdown barrier, say) would wait for the
    # peers this process may have lost; exit without running them.
    if args.debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _train_here(args: argparse.Namespace, config: RunConfig) -> int:
    assert config.train is not None or config.trainer is None
    run = config.train
    if run is None:
        raise ConfigError(f"{config.source}: `looproto train` needs a `[train]` table.")
    if distributed.is_chief():
        check_model_dir(config, train=True)
    with distributed.scope():  # Variables made here are the engine's (mirrored on TF).
        controller = build(config, train=True)
    with controller:
        if preemption.requested():  # a signal during start-up: stop before training
            signal = preemption.signal_received()
            preemption.acknowledge()
            raise StoppedInStartUp(signal.name if signal is not None else "a stop request")
        with _progress(controller, run.steps, not args.no_progress) as bar:
            if bar is not None:
                controller.train_actions = (*controller.train_actions, bar)
            if controller.evaluator is not None:
                output = controller.train_and_evaluate(
                    train_steps=run.steps,
                    eval_steps=run.eval_steps,
                    eval_interval=run.eval_interval,
                )
            else:
                controller.train(run.steps)
                output = None
    if not distributed.is_chief():
        return 0
    step = int(np.asarray(_read(controller.global_step)))
    summary = f"trained to step {step}; summaries in {config.summary_dir}"
    if config.checkpoint.enabled:
        summary += f", checkpoints in {config.checkpoint_dir}"
    if distributed.process_count() > 1:
        summary += f" ({distributed.process_count()} processes)"
    print(summary)
    for action in controller.eval_actions:
        if getattr(action, "should_stop", False):
            print(f"stopped early: {action.reason}")
    if output:
        print(f"eval: {_scalars(output)}")
    return 0


def _read(step: Any) -> Any:
    from looproto.module import variable_to_numpy

    return variable_to_numpy(step)


def _scalars(output: Any) -> str:
    from looproto.run.progress import format_outputs

    return format_outputs(output, limit=8)


def _evaluate(args: argparse.Namespace) -> int:
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise ConfigError(
            "`--timeout` must be a number of seconds >= 0 (finite; leave it out to use "
            f"`evaluate.timeout`, or to wait forever); received {args.timeout}."
        )
    config = load(args.config, args.set)
    check_model_dir(config, train=False)
    controller = build(config, train=False)
    steps = config.evaluate.steps
    with controller:
        if args.continuous:
            if controller.checkpoint_manager is None:
                raise ConfigError(
                    f"{config.source}: `--continuous` watches the checkpoint directory, but "
                    "`checkpoint.enabled` is false."
                )
            timeout = args.timeout if args.timeout is not None else config.evaluate.timeout
            output = controller.evaluate_continuously(steps, timeout=timeout)
        else:
            output = controller.evaluate(steps)
    step = int(np.asarray(_read(controller.global_step)))
    print(f"evaluated at step {step}: {_scalars(output or {})}")
    return 0


def _backends(args: argparse.Namespace) -> int:
    rows = []
    for name in backends.available():
        try:
            version = backends.get(name).version()
            rows.append((name, "usable", version))
        except LooprotoError as err:
            rows.append((name, "not installed", str(err).split(". ")[-1]))
    width = max(len(r[0]) for r in rows)
    default = backends.default_name()
    for name, status, detail in rows:
        marker = " (default)" if name == default else ""
        print(f"{name:<{width}}  {status:<13}  {detail}{marker}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from looproto.checkpoint import read_metadata

    meta = read_metadata(args.directory, args.step)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    print(f"{os.path.abspath(args.directory)}")
    print(f"steps: {', '.join(map(str, meta['steps']))} (showing {meta['step']})")
    tree = meta["tree"]
    total = sum(
        int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize
        for spec in tree.values()
    )
    print(f"{len(tree)} arrays, {total:,} bytes")
    if tree:
        width = max(len(path) for path in tree)
        shapes = {path: str(tuple(spec["shape"])) for path, spec in tree.items()}
        shape_width = max(len(s) for s in shapes.values())
        for path in sorted(tree):
            print(f"  {path:<{width}}  {shapes[path]:<{shape_width}}  {tree[path]['dtype']}")
    objects = meta["objects"]
    if objects:
        print(f"{len(objects)} object states")
        for path in sorted(objects):
            size = len(json.dumps(objects[path]["state"]))
            print(f"  {path}  {objects[path]['kind']}  ({size:,} bytes of JSON)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="looproto", description="Train and evaluate from a run config; inspect runs."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="the run config (TOML)")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.steps=1000 (repeatable)",
        )
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        return sub

    train = with_config("train", "train (and evaluate) as the config says; resumes")
    train.add_argument("--no-progress", action="store_true", help="no live progress bar")
    train.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="spawn N local worker processes on the backend's distributed engine "
        "(default: [distributed] num_processes)",
    )
    train.set_defaults(run=_train)
    evaluate = with_config("evaluate", "evaluate the newest checkpoint, or each new one")
    evaluate.add_argument("--continuous", action="store_true", help="evaluate each new checkpoint")
    evaluate.add_argument("--timeout", type=float, default=None, help="seconds to wait for one")
    evaluate.set_defaults(run=_evaluate)
    listing = commands.add_parser("backends", help="which backends are installed and usable")
    listing.set_defaults(run=_backends)
    inspect = commands.add_parser("inspect", help="what a checkpoint directory holds")
    inspect.add_argument("directory", help="a checkpoint directory (holding <step>/ dirs)")
    inspect.add_argument("--step", type=int, default=None, help="which step (default: newest)")
    inspect.add_argument("--json", action="store_true", help="print the metadata as JSON")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `looproto` command; returns its exit status."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up banner
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    enable_logging(logging.INFO)
    quiet_background_tracebacks(args.debug)
    # Factories named relative to the current directory import, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return int(args.run(args))
    except Preempted as stop:
        # Not an error: the state is saved and the same command resumes it.
        print(f"looproto: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("looproto: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        status = exit_status(err)
        if status is None or args.debug:
            raise
        print(f"looproto: error: {one_line(err)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
