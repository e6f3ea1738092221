"""TensorFlow's own checkpoints: `tf.train.CheckpointManager` and `tf.train.Checkpoint`.

`TfCheckpointManager` puts a `tf.train.CheckpointManager` behind the protocol the
`Controller` uses (`looproto.controller.CheckpointManagerLike`): TensorFlow writes and
reads the `ckpt-N` files, with its deferred restores of variables created later (a
Keras optimizer's slots); looproto adds two refusals. A `tf.train.Checkpoint` that
tracks no variable is refused at the first save instead of writing an empty
checkpoint, and the `Controller` checks, after a restore, that the manager's
`step_counter` reads the checkpoint's number (`check_restored_step`).

`checkpoint_paths` lists the variables a `tf.train.Checkpoint` tracks by their
attribute paths, so that a `tf.train.Checkpoint` given as the root of a
`looproto.CheckpointManager` saves what it tracks (the backend's `expand`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import tensorflow as tf

from looproto.errors import CheckpointError, ConfigError, value_repr

Paths = list[tuple[tuple[Any, ...], Any]]


def _save_counter(checkpoint: Any) -> Any:
    # The counter `tf.train.Checkpoint.save` numbers its files by: bookkeeping, not state.
    return getattr(checkpoint, "_save_counter", None)


def tracked_variables(root: Any) -> list[Any]:
    """The `tf.Variable`s reachable from the trackable `root` (its save counter aside)."""
    skip = _save_counter(root)
    return [
        obj
        for obj in tf.train.TrackableView(root).descendants()
        if isinstance(obj, tf.Variable) and obj is not skip
    ]


def checkpoint_paths(
    checkpoint: Any,
    expand: Callable[[Any], Iterable[tuple[tuple[Any, ...], Any]] | None],
    is_variable: Callable[[Any], bool],
) -> Paths:
    """`(path, variable)` for every variable a `tf.train.Checkpoint` tracks.

    The path of a child is its name in the checkpoint (`model`, `optimizer`), then what
    `expand` (the backend's) says for a `tf.Module` or Keras object, else the names of
    the child's own trackable children.
    """
    found: Paths = []
    seen: set[int] = {id(checkpoint)}
    skip = _save_counter(checkpoint)

    def walk(obj: Any, path: tuple[Any, ...]) -> None:
        for name, child in tf.train.TrackableView(obj).children(obj).items():
            if child is skip or id(child) in seen:
                continue
            seen.add(id(child))
            if is_variable(child):
                found.append(((*path, name), child))
                continue
            expanded = expand(child)
            if expanded is not None:
                found.extend(((*path, name, *sub), leaf) for sub, leaf in expanded)
            else:
                walk(child, (*path, name))

    walk(checkpoint, ())
    return found


class TfCheckpointManager:
    """A `tf.train.CheckpointManager`, as the `Controller` drives a checkpoint manager.

    Saves and restores go to TensorFlow (`ckpt-N` files, its `max_to_keep` and
    `checkpoint_interval` rules); every other attribute is the wrapped manager's.

    Args:
        manager: The `tf.train.CheckpointManager`.
        enable_async: Save in the background (`tf.train.CheckpointOptions(enable_async=True)`);
            `sync()` waits for the save.

    Raises:
        ConfigError: `manager` is not a `tf.train.CheckpointManager`.
    """

    def __init__(self, manager: Any, *, enable_async: bool = False) -> None:
        if not isinstance(manager, tf.train.CheckpointManager):
            raise ConfigError(
                "`manager` must be a `tf.train.CheckpointManager`; received "
                f"{value_repr(manager)} of type {type(manager).__name__}."
            )
        if not isinstance(enable_async, bool):
            raise ConfigError(
                f"`enable_async` must be a bool; received enable_async={value_repr(enable_async)}."
            )
        self.manager = manager
        self.enable_async = enable_async
        self._options = tf.train.CheckpointOptions(enable_async=enable_async)
        self._has_variables = False

    @property
    def directory(self) -> str:
        """The checkpoint directory."""
        return str(self.manager.directory)

    @property
    def checkpoint_interval(self) -> int | None:
        """The manager's `checkpoint_interval`."""
        interval = self.manager.checkpoint_interval
        return None if interval is None else int(interval)

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint's path prefix (`<dir>/ckpt-N`), or None."""
        latest = self.manager.latest_checkpoint
        return None if latest is None else str(latest)

    @property
    def step_counter(self) -> Any:
        """The `step_counter` the wrapped manager was given, or None."""
        return getattr(self.manager, "_step_counter", None)

    def save(self, checkpoint_number: int | None = None, check_interval: bool = True) -> Any:
        """`tf.train.CheckpointManager.save`, refusing a checkpoint that tracks no variable.

        Raises:
            CheckpointError: The `tf.train.Checkpoint` tracks no variable.
        """
        if not self._has_variables:
            checkpoint = self.manager.checkpoint
            if not tracked_variables(checkpoint):
                raise CheckpointError(
                    f"Not saving a checkpoint to {self.directory}: the "
                    f"`tf.train.Checkpoint` {value_repr(checkpoint)} tracks no variable, so "
                    "it would restore nothing. Pass the model, optimizer and step to it "
                    "(`tf.train.Checkpoint(model=..., optimizer=...)`), after the model "
                    "is built."
                )
            self._has_variables = True
        return self.manager.save(
            checkpoint_number=checkpoint_number,
            check_interval=check_interval,
            options=self._options,
        )

    def restore(self, checkpoint: Any) -> str:
        """Restores the checkpoint at the path prefix `checkpoint`; returns it."""
        self.manager.sync()
        self.manager.checkpoint.restore(checkpoint)
        return str(checkpoint)

    def restore_or_initialize(self) -> str | None:
        """`tf.train.CheckpointManager.restore_or_initialize`."""
        self.manager.sync()
        path = self.manager.restore_or_initialize()
        return None if path is None else str(path)

    def sync(self) -> None:
        """Waits for an asynchronous save to finish."""
        self.manager.sync()

    def __getattr__(self, name: str) -> Any:
        # Everything else (`checkpoints`, `checkpoint`, ...) is the wrapped manager's.
        return getattr(self.__dict__["manager"], name)

    def __repr__(self) -> str:
        return f"TfCheckpointManager({self.manager!r}, enable_async={self.enable_async})"
