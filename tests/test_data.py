"""ArrayDataset: batching, shuffling, epochs, and the iterator-state protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest

import looproto
from looproto.data import ArrayDataset, StatefulIterator


def test_batches_cover_every_example_once_per_epoch_when_shuffled():
    ds = ArrayDataset({"x": np.arange(20)}, batch_size=5, shuffle=True, seed=3, epochs=2)
    batches = [batch["x"] for batch in ds]
    assert len(batches) == len(ds) == 8
    first, second = np.concatenate(batches[:4]), np.concatenate(batches[4:])
    assert sorted(first) == sorted(second) == list(range(20))
    assert first.tolist() != second.tolist()  # reshuffled each epoch


def test_remainder_is_kept_or_dropped():
    kept = ArrayDataset(np.arange(7), 3, drop_remainder=False)
    assert [b.tolist() for b in kept] == [[0, 1, 2], [3, 4, 5], [6]]
    dropped = ArrayDataset(np.arange(7), 3)
    assert [b.tolist() for b in dropped] == [[0, 1, 2], [3, 4, 5]]


def test_state_round_trips_through_json_and_resumes_exactly():
    ds = ArrayDataset((np.arange(30), np.arange(30) * 10), 4, shuffle=True, seed=7, epochs=None)
    straight = iter(ds)
    expected = [next(straight)[1].tolist() for _ in range(20)]

    it = iter(ds)
    assert isinstance(it, StatefulIterator)
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(ds)
    resumed.set_state(state)
    assert [next(resumed)[1].tolist() for _ in range(11)] == expected[9:]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be a positive int"),
        ({"batch_size": 2, "epochs": 0}, "`epochs` must be a positive int or None"),
        ({"batch_size": 50}, "larger than the data"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(looproto.ConfigError, match=match):
        ArrayDataset(np.arange(10), **kwargs)


def test_mismatched_first_dimensions_are_rejected():
    with pytest.raises(looproto.ConfigError, match="share their first dimension"):
        ArrayDataset({"x": np.zeros(4), "y": np.zeros(5)}, 2)


def test_bad_state_is_rejected():
    with pytest.raises(looproto.ConfigError, match="must be a dict with int `epoch`"):
        iter(ArrayDataset(np.arange(4), 2)).set_state({"epoch": "one"})
