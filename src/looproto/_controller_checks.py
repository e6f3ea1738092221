"""Private: the checks of the `Controller`'s arguments, and of the global step as it runs.

Each raises `ConfigError` (a wrong value) or `ProtocolError` (an object without the
methods it needs) naming the argument and what was received.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from looproto import distributed
from looproto.errors import CheckpointError, ConfigError, ProtocolError, value_repr
from looproto.module import is_variable, read_int, variable_to_numpy
from looproto.runner import Evaluator, Output, Trainer

__all__ = [
    "CheckpointManagerLike",
    "check_actions",
    "check_global_step",
    "check_outputs",
    "check_restored_step",
    "check_runners",
    "check_step_agrees",
    "check_steps",
    "checkpoint_number",
]


@runtime_checkable
class CheckpointManagerLike(Protocol):
    """What the `Controller` needs of a checkpoint manager (see `CheckpointManager`)."""

    @property
    def directory(self) -> str: ...

    @property
    def checkpoint_interval(self) -> int | None: ...

    @property
    def latest_checkpoint(self) -> str | None: ...

    def save(self, checkpoint_number: int | None = None, check_interval: bool = True) -> Any: ...

    def restore(self, checkpoint: Any) -> Any: ...

    def restore_or_initialize(self) -> str | None: ...

    def sync(self) -> None: ...


def check_global_step(global_step: Any) -> None:
    if global_step is None or not is_variable(global_step):
        raise ConfigError(
            "`global_step` must be a variable holding a scalar integer, e.g. "
            "`looproto.create_global_step()` (or a `tf.Variable`/torch tensor the trainer "
            f"advances); received global_step={value_repr(global_step)}."
        )
    value = np.asarray(variable_to_numpy(global_step))
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ConfigError(
            "`global_step` must hold a scalar integer; received a variable of shape "
            f"{value.shape} and dtype {value.dtype}."
        )


def check_runners(trainer: Any, evaluator: Any, steps_per_loop: Any, summary_interval: Any) -> None:
    """The trainer and evaluator, and the loop lengths that go with them."""
    if trainer is None and evaluator is None:
        raise ConfigError("`trainer` and `evaluator` should not both be `None`.")
    if trainer is not None:
        if not isinstance(trainer, Trainer):
            raise ProtocolError(
                "`trainer` must have a `train(num_steps)` method (the `Trainer` protocol); "
                f"received {value_repr(trainer)} of type {type(trainer).__name__}."
            )
        if steps_per_loop is None:
            raise ConfigError("`steps_per_loop` is required when `trainer` is provided.")
    # Checked even without a trainer (where Orbit ignores them): a wrong value is a
    # mistake wherever it is passed.
    # Python ints only: the Controller tells a fixed loop length from a callable one by
    # `isinstance(..., int)`, and the two lengths are held to the same rule.
    if (
        steps_per_loop is not None
        and not callable(steps_per_loop)
        and not _python_int(steps_per_loop)
    ):
        raise ConfigError(
            "`steps_per_loop` must be a positive int or a callable of the global "
            f"step; received steps_per_loop={value_repr(steps_per_loop)}."
        )
    if summary_interval is not None:
        if not _python_int(summary_interval):
            raise ConfigError(
                "`summary_interval` must be a positive int or None; received "
                f"summary_interval={value_repr(summary_interval)}."
            )
        if isinstance(steps_per_loop, int) and summary_interval % steps_per_loop != 0:
            raise ConfigError(
                f"`summary_interval` ({summary_interval}) must be a multiple of "
                f"`steps_per_loop` ({steps_per_loop}), so that summaries fall on "
                "inner-loop boundaries."
            )
    if evaluator is not None and not isinstance(evaluator, Evaluator):
        raise ProtocolError(
            "`evaluator` must have an `evaluate(num_steps)` method (the `Evaluator` "
            f"protocol); received {value_repr(evaluator)} of type {type(evaluator).__name__}."
        )


def check_outputs(
    *,
    checkpoint_manager: Any,
    summary_dir: Any,
    eval_summary_dir: Any,
    summary_manager: Any,
    eval_summary_manager: Any,
) -> None:
    """Where checkpoints and summaries go."""
    if checkpoint_manager is not None and not isinstance(checkpoint_manager, CheckpointManagerLike):
        raise ProtocolError(
            "`checkpoint_manager` must be a `looproto.CheckpointManager` (or have its "
            "`directory`, `checkpoint_interval` and `latest_checkpoint` properties and its "
            "`save`/`restore`/`restore_or_initialize`/`sync` methods); received "
            f"{value_repr(checkpoint_manager)}. (A `tf.train.CheckpointManager` works with "
            "`looproto.orbit.Controller`.)"
        )
    for argument, value in (
        ("summary_dir", summary_dir),
        ("eval_summary_dir", eval_summary_dir),
    ):
        if value is not None and not isinstance(_fspath(value), str):
            raise ConfigError(
                f"`{argument}` must be a path (a str or an `os.PathLike` of one) or None; "
                f"received {argument}={value_repr(value)}."
            )
    for argument, manager in (
        ("summary_manager", summary_manager),
        ("eval_summary_manager", eval_summary_manager),
    ):
        if manager is not None and not all(
            callable(getattr(manager, name, None)) for name in ("write_summaries", "flush", "close")
        ):
            raise ProtocolError(
                f"`{argument}` must be a `looproto.SummaryManager` (or have its "
                f"`write_summaries`/`flush`/`close` methods); received {value_repr(manager)}."
            )


# The number at the end of a checkpoint's name: `<dir>/200` (looproto), `ckpt-200`.
_CHECKPOINT_NUMBER = re.compile(r"(\d+)$")


def checkpoint_number(path: Any) -> int | None:
    """The number a checkpoint's path ends with (`<dir>/200`, `<dir>/ckpt-200`), or None."""
    match = _CHECKPOINT_NUMBER.search(os.path.basename(os.fspath(path).rstrip("/")))
    return None if match is None else int(match.group(1))


def check_restored_step(manager: Any, path: Any) -> None:
    """After restoring checkpoint N, a manager's step counter must read N.

    Checkpoints the `Controller` saves are numbered by the global step, so a counter
    that reads anything else after a restore was not restored with the rest: training
    would go on from the wrong step (or restart at 0) with the weights of step N.
    Managers without a `step_counter` (their numbers may count saves) are not checked.

    Raises:
        CheckpointError: The step counter does not read the checkpoint's number.
    """
    counter = getattr(manager, "step_counter", None)
    number = checkpoint_number(path)
    if counter is None or not is_variable(counter) or number is None:
        return
    restored = read_int(counter)
    if restored != number:
        raise CheckpointError(
            "The global step is not part of what was checkpointed: after restoring "
            f"checkpoint {number} ({path}) the step counter "
            f"{getattr(counter, 'name', value_repr(counter))!r} reads {restored}, so training "
            f"would go on from step {restored} with the state of step {number}. Make the "
            "step counter part of the checkpoint: hold it in the object the checkpoint "
            "manager saves (an attribute of the trainer, an entry of the "
            "`tf.train.Checkpoint`); when it is an optimizer's `iterations`, checkpoint "
            "that optimizer."
        )


def check_step_agrees(global_step: Any, when: str) -> None:
    """In a multi-process run, every process must be at the same global step."""
    if distributed.process_count() > 1:
        distributed.check_same(
            {"global_step": read_int(global_step)},
            f"the global step at {when}",
            hint=(
                "Every process must run the same steps: did one restore another checkpoint, "
                "or one trainer's data end earlier?"
            ),
        )


def _fspath(value: Any) -> Any:
    try:
        return os.fspath(value)
    except TypeError:  # a `__fspath__` that returns neither str nor bytes
        return None


def check_actions(
    actions: Iterable[Callable[[Output], None]] | None, argument: str
) -> tuple[Callable[[Output], None], ...]:
    if actions is None:
        return ()
    if isinstance(actions, Mapping) or not isinstance(actions, Iterable):
        raise ConfigError(
            f"`{argument}` must be an iterable of callables; received {value_repr(actions)}."
        )
    result = tuple(actions)
    for action in result:
        if not callable(action):
            raise ProtocolError(
                f"Every entry of `{argument}` must be callable with the loop's output; "
                f"received {value_repr(action)}."
            )
    return result


def check_steps(steps: Any, argument: str, *, allow_zero: bool, allow_all: bool = True) -> int:
    if isinstance(steps, np.integer):
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"`{argument}` must be an int; received {argument}={steps!r}.")
    if steps == -1 and allow_all:
        return steps
    if steps < 0 or (steps == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        also = ", or == -1 (until the data ends)" if allow_all else ""
        raise ConfigError(f"`{argument}` ({steps}) should be {expected}{also}.")
    return steps


def _python_int(value: Any) -> bool:
    """A positive Python int (not a bool, not a NumPy integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
