"""`Variable`s holding pytrees (`TreeVariable`), framework-free: what `.shape`, `.dtype`
and `assign` mean for them, and checkpoints that hold each leaf under its own path."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest

import looproto
from looproto.checkpoint import read_metadata
from looproto.errors import CheckpointError, ProtocolError, ShapeError
from looproto.module import TreeLeaf, TreeVariable, variable_to_numpy, variables_by_path

Moments = namedtuple("Moments", ["count", "mu", "nu"])


def optimizer_state(seed: int) -> tuple[Any, ...]:
    """An optax-shaped state: a tuple of namedtuples of dicts of arrays (and None)."""
    rng = np.random.default_rng(seed)
    mu = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    nu = {"w": rng.random((3, 2)).astype(np.float32), "b": np.ones(2, np.float32)}
    return (Moments(np.int32(seed), mu, nu), None, ())


def test_a_dict_namedtuple_or_list_of_arrays_makes_a_tree_variable() -> None:
    state = looproto.Variable(optimizer_state(1), trainable=False, name="opt")
    assert isinstance(state, TreeVariable) and isinstance(state, looproto.Variable)
    assert state.shape == (
        Moments((), {"b": (2,), "w": (3, 2)}, {"b": (2,), "w": (3, 2)}),
        None,
        (),
    )
    assert state.dtype[0].count == np.int32 and state.dtype[0].mu["w"] == np.float32
    assert list(state.leaves()) == ["0/count", "0/mu/b", "0/mu/w", "0/nu/b", "0/nu/w"]
    assert isinstance(looproto.Variable([np.zeros(2), {"a": 1.0}]), TreeVariable)
    # Numbers (and lists of numbers) stay one array, as before.
    assert type(looproto.Variable([1.0, 2.0])) is looproto.Variable
    assert type(looproto.Variable(3)) is looproto.Variable
    with pytest.raises(ProtocolError, match="holds 'x' of type str"):
        looproto.Variable({"a": "x"})


def test_the_value_is_copied_in_and_assign_keeps_structure_shapes_and_dtypes() -> None:
    source = {"w": np.zeros((2, 2), np.float32), "step": 0}
    v = looproto.Variable(source, name="v")
    source["w"][0, 0] = 5.0  # The variable has its own copy.
    assert v.value["w"][0, 0] == 0.0 and v.value["step"].dtype == np.int64
    new = {"w": np.ones((2, 2), np.float32), "step": 3}  # a number casts to the leaf dtype
    v.assign(new)
    new["w"][1, 1] = 7.0
    assert float(v.numpy()["w"].sum()) == 4.0 and int(v.value["step"]) == 3
    with pytest.raises(ShapeError, match=r"shape \(3, 2\).*'v:0' at 'w'"):
        v.assign({"w": np.zeros((3, 2), np.float32), "step": 0})
    with pytest.raises(ShapeError, match=r"dtype float64.*'v:0' at 'w'"):
        v.assign({"w": np.zeros((2, 2)), "step": 0})
    with pytest.raises(ShapeError, match=r"keys \['step', 'w'\]"):
        v.assign({"w": np.zeros((2, 2), np.float32)})
    with pytest.raises(ShapeError, match="expected a dict"):
        v.assign([np.zeros((2, 2), np.float32), 0])
    with pytest.raises(ProtocolError, match="holds a tree"):
        v.assign_add(1)
    with pytest.raises(ProtocolError, match="holds a tree"):
        float(v)


def test_each_leaf_is_checkpointed_under_its_path_and_restored(tmp_path: Any) -> None:
    class Holder(looproto.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.opt = looproto.Variable(optimizer_state(seed), trainable=False, name="opt")
            self.w = looproto.Variable(np.full(3, float(seed), np.float32), name="w")

    source, target = Holder(1), Holder(2)
    with looproto.CheckpointManager(str(tmp_path), source) as manager:
        manager.save(checkpoint_number=1)
    tree = read_metadata(str(tmp_path))["tree"]
    assert sorted(tree) == [
        "opt/0/count",
        "opt/0/mu/b",
        "opt/0/mu/w",
        "opt/0/nu/b",
        "opt/0/nu/w",
        "w",
    ]
    assert tree["opt/0/mu/w"] == {**tree["opt/0/mu/w"], "shape": [3, 2], "dtype": "float32"}
    looproto.CheckpointManager(str(tmp_path), target).restore(1)
    for got, want in zip(variables_by_path(target).values(), variables_by_path(source).values()):
        for a, b in zip(_leaves(variable_to_numpy(got)), _leaves(variable_to_numpy(want))):
            np.testing.assert_array_equal(a, b)
    assert target.opt.value[1] is None and target.opt.value[2] == ()

    # Another structure does not match the checkpoint: named, and nothing is restored.
    class Other(Holder):
        def __init__(self) -> None:
            super().__init__(3)
            self.opt = looproto.Variable(
                (Moments(np.int32(0), {"w": np.zeros((3, 2), np.float32)}, {}), None, ()),
                trainable=False,
            )

    other = Other()
    with pytest.raises(CheckpointError, match=r"'opt/0/mu/b'.*not a live variable") as info:
        looproto.CheckpointManager(str(tmp_path), other).restore(1)
    assert "'opt/0/nu/w'" in str(info.value)
    assert float(other.w.numpy()[0]) == 3.0


def test_a_leaf_reads_and_writes_like_a_variable() -> None:
    v = looproto.Variable({"a": {"b": np.zeros(2, np.float32)}, "c": np.int64(1)}, name="t")
    leaf = v.leaves()["a/b"]
    assert isinstance(leaf, TreeLeaf) and leaf.name == "t:0/a/b"
    assert leaf.shape == (2,) and leaf.dtype == np.float32
    leaf.assign(np.array([1.0, 2.0], np.float32))
    np.testing.assert_array_equal(v.value["a"]["b"], [1.0, 2.0])
    assert int(v.value["c"]) == 1
    with pytest.raises(ShapeError):
        leaf.assign(np.zeros(3, np.float32))


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [] if tree is None else [tree]
