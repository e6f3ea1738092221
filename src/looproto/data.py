"""In-memory datasets whose iterators can be checkpointed.

`ArrayDataset` batches a (nested) structure of arrays that share their first
dimension. Its iterator follows looproto's *iterator-state protocol*:
`get_state()` returns a small JSON-serialisable dict and `set_state(state)`
resumes from it. A `CheckpointManager` saves the state of every such object it
finds in the module tree, so a run that is stopped and resumed sees exactly the
batches an uninterrupted run would have seen.

Shuffling is a pure function of `(seed, epoch)`, so the state is just the epoch
and the position in it.

In a multi-process run, `shard=(index, count)` (`looproto.distributed.shard()`)
makes the dataset yield process `index`'s slice of each *global* batch: every
process walks the same global batches in the same order, and process `index` gets
rows `[index * batch_size // count, (index + 1) * batch_size // count)` of each.
Together the processes see exactly the batches one process would, which is what
lets a data-parallel run match a one-process run on the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from looproto import _nest
from looproto._validate import positive_int
from looproto.errors import ConfigError, value_repr

__all__ = ["ArrayDataset", "ArrayIterator", "StatefulIterator"]


@runtime_checkable
class StatefulIterator(Protocol):
    """The iterator-state protocol: a position that survives a checkpoint."""

    def get_state(self) -> Any:
        """A JSON-serialisable description of the current position."""
        ...

    def set_state(self, state: Any) -> None:
        """Moves to the position `state` (as returned by `get_state`)."""
        ...


def _leaves(data: Any) -> list[np.ndarray[Any, Any]]:
    return [np.asarray(leaf) for _, leaf in _nest.flatten_with_paths(data)]


class ArrayDataset:
    """Batches of a nested structure of arrays, optionally shuffled, for some epochs.

    Example:
        >>> ds = ArrayDataset({"x": np.arange(10), "y": np.arange(10) * 2}, batch_size=4)
        >>> [batch["x"].tolist() for batch in ds]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        drop_remainder: bool = True,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """Initialises the dataset.

        Args:
            data: An array, or a mapping/tuple/list of arrays with equal first dims.
            batch_size: Examples per batch: the *global* batch when sharded.
            shuffle: Shuffle the examples anew each epoch.
            seed: Seed of the shuffling.
            epochs: Passes over the data; None repeats forever.
            drop_remainder: Drop the last, smaller batch of an epoch.
            shard: `(index, count)`: yield only process `index`'s slice of each
                global batch, out of `count` processes (`distributed.shard()`).
                `batch_size` must be divisible by `count`; a smaller last batch
                (`drop_remainder=False`) is split as evenly as it goes.
        """
        batch_size = int(positive_int(batch_size, "batch_size"))
        positive_int(epochs, "epochs", allow_none=True)
        leaves = _leaves(data)
        if not leaves:
            raise ConfigError(f"`data` holds no arrays; received {value_repr(data)}.")
        sizes = {len(leaf) if leaf.ndim else -1 for leaf in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise ConfigError(
                "All arrays in `data` must share their first dimension; received first "
                f"dimensions {sorted(sizes)}."
            )
        self.data = data
        self.num_examples = sizes.pop()
        if drop_remainder and self.num_examples < batch_size:
            raise ConfigError(
                f"`batch_size` ({batch_size}) is larger than the data ({self.num_examples} "
                "examples) and `drop_remainder=True`: every batch would be dropped."
            )
        self.shard = _check_shard(shard, batch_size)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epochs = epochs
        self.drop_remainder = drop_remainder

    @property
    def batches_per_epoch(self) -> int:
        """How many batches one epoch yields."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def __iter__(self) -> ArrayIterator:
        return ArrayIterator(self)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("An `ArrayDataset` with `epochs=None` is infinite.")
        return self.batches_per_epoch * self.epochs


def _check_shard(shard: Any, batch_size: int) -> tuple[int, int]:
    valid = (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not valid:
        raise ConfigError(
            "`shard` must be a tuple `(index, count)` of ints with 0 <= index < count, e.g. "
            f"`looproto.distributed.shard()`; received shard={value_repr(shard)}."
        )
    index, count = shard
    if batch_size % count:
        raise ConfigError(
            f"`batch_size` ({batch_size}) must be divisible by the number of processes in "
            f"`shard` ({count}): each process takes an equal slice of every global batch."
        )
    return index, count


class ArrayIterator(Iterator[Any]):
    """The iterator of an `ArrayDataset`; follows the iterator-state protocol."""

    def __init__(self, dataset: ArrayDataset) -> None:
        self._dataset = dataset
        self._epoch = 0
        self._batch = 0
        self._order: np.ndarray[Any, Any] | None = None

    def _indices(self) -> np.ndarray[Any, Any] | slice:
        ds = self._dataset
        start = self._batch * ds.batch_size
        stop = min(start + ds.batch_size, ds.num_examples)
        index, count = ds.shard
        if count > 1:  # This process's slice of the global batch [start, stop).
            size = stop - start
            start, stop = start + index * size // count, start + (index + 1) * size // count
        if not ds.shuffle:
            return slice(start, stop)
        if self._order is None:
            rng = np.random.default_rng([ds.seed, self._epoch])
            self._order = rng.permutation(ds.num_examples)
        return self._order[start:stop]

    def __next__(self) -> Any:
        ds = self._dataset
        if self._batch >= ds.batches_per_epoch:
            self._epoch += 1
            self._batch = 0
            self._order = None
        if ds.epochs is not None and self._epoch >= ds.epochs:
            raise StopIteration
        index = self._indices()
        self._batch += 1
        return _nest.map_output(lambda leaf: np.asarray(leaf)[index], ds.data)

    def get_state(self) -> dict[str, int]:
        """See `StatefulIterator.get_state`."""
        return {"epoch": self._epoch, "batch": self._batch}

    def set_state(self, state: Any) -> None:
        """See `StatefulIterator.set_state`."""
        if (
            not isinstance(state, Mapping)
            or not isinstance(state.get("epoch"), int)
            or not isinstance(state.get("batch"), int)
        ):
            raise ConfigError(
                "`state` of an `ArrayIterator` must be a dict with int `epoch` and `batch`; "
                f"received {value_repr(state)}."
            )
        self._epoch = state["epoch"]
        self._batch = state["batch"]
        self._order = None
