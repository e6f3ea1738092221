"""The live side of a restore: the tree walked, `restore_first` states set, `allow_missing`.

Before a checkpoint is compared with the live tree, the tree is walked once; a leaf
that is `Unsaveable` is named at once, and object states marked `restore_first` (a
lazily built Keras optimizer's record of the variables it was built for) are set, since
they create variables, before the tree is walked again. `allow_missing` lists the live
paths (or glob patterns) that a checkpoint may lack, keeping their live values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from looproto.checkpoint._state import (
    checkpoint_variables,
    from_json,
    is_generator,
    is_stateful,
    read_state,
    state_adapter,
)
from looproto.errors import CheckpointError, ConfigError, value_repr
from looproto.module import variables_by_path

__all__ = ["check_allow_missing", "live_tree"]


def live_tree(
    root: Any, objects: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The live variables and object states of `root`, ready to be compared and written.

    An object state marked `restore_first` (a lazily built Keras optimizer's: which
    variables it was built for) is set from the checkpoint before anything is compared,
    since it creates variables; such a state must be harmless if the restore then fails
    (building slots a first step would build anyway). The tree is walked again after.

    Raises:
        CheckpointError: A live leaf is `Unsaveable`, or a `restore_first` state failed.
    """
    variables = checkpoint_variables(root)
    live_objects = variables_by_path(root, predicate=is_stateful)
    first = False
    for path, obj in live_objects.items():
        read_state(obj, path, "restore into")  # An `Unsaveable` leaf is named before all else.
        adapter = None if is_generator(obj) else state_adapter(obj)
        if adapter is not None and getattr(adapter, "restore_first", False) and path in objects:
            try:
                adapter.set_state(from_json(objects[path]["state"], path, variables))
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(
                    f"Checkpoint {where}: preparing {path!r} for the restore failed "
                    f"({type(err).__name__}: {err}); nothing was restored."
                ) from err
            first = True
    if first:
        variables = checkpoint_variables(root)
        live_objects = variables_by_path(root, predicate=is_stateful)
    return variables, live_objects


def check_allow_missing(allow_missing: Any) -> tuple[str, ...]:
    """`allow_missing` as a tuple of path patterns.

    Raises:
        ConfigError: It is not a sequence of strings.
    """
    if isinstance(allow_missing, str) or not isinstance(allow_missing, (list, tuple)):
        raise ConfigError(
            "`allow_missing` must be a list of paths or glob patterns (`'scheduler/*'`); "
            f"received allow_missing={value_repr(allow_missing)}."
        )
    if not all(isinstance(p, str) and p for p in allow_missing):
        raise ConfigError(
            f"`allow_missing` must hold non-empty strings; received {value_repr(allow_missing)}."
        )
    return tuple(allow_missing)
