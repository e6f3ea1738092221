"""The torch state zoo: real optimizers, schedulers, scalers and generators resume exactly.

Each case (`_zoo_torch.py`) trains `N` steps, is checkpointed, restored in a fresh
process and trained `M` more; every array a checkpoint holds and every learning rate,
after every step, must equal an uninterrupted `N + M` run's bit for bit (or stay within
the case's stated bound). What looproto cannot store makes `save()` fail, naming it.
"""

from __future__ import annotations

import collections
import copy
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import looproto  # noqa: E402
from looproto.errors import CheckpointError, ConfigError  # noqa: E402
from looproto.module import variable_to_numpy, variables_by_path  # noqa: E402
from tests.backends import _zoo, _zoo_torch  # noqa: E402

L = torch.optim.lr_scheduler
CASES = {case.name: case for case in _zoo_torch.CASES}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both phases of every torch case, each phase in one fresh process."""
    directory = tmp_path_factory.mktemp("torch_zoo")
    _zoo.spawn("torch", "first", directory)
    _zoo.spawn("torch", "resume", directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_in_a_fresh_process_matches_an_uninterrupted_run(zoo: Path, name: str) -> None:
    _zoo.compare(zoo, CASES[name])


# -- what cannot be saved fails loudly -------------------------------------------------------


def save(root: Any, directory: Path, step: int = 1) -> None:
    with looproto.CheckpointManager(directory, root) as manager:
        manager.save(checkpoint_number=step)


def test_lbfgs_history_is_refused_naming_its_path(tmp_path: Path) -> None:
    trainer = looproto.Module(name="trainer")
    trainer.model = _zoo_torch.Net()
    trainer.optimizer = torch.optim.LBFGS(trainer.model.parameters(), lr=0.1, history_size=3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure() -> Any:
        trainer.optimizer.zero_grad()
        loss = torch.mean((trainer.model(x) - y) ** 2)
        loss.backward()
        return loss

    trainer.optimizer.step(closure)
    assert len(variables_by_path(trainer)) > 0  # Walking the tree still works.
    with pytest.raises(CheckpointError, match=r"'optimizer/state/0/\w+'.*LBFGS.*list") as info:
        save(trainer, tmp_path)
    assert "LBFGS keeps its history" in str(info.value)
    assert not list(tmp_path.iterdir())  # Nothing written.


class RecentLosses:
    """A `LambdaLR` factor that keeps a `deque` of recent values: not storable."""

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=3)

    def __call__(self, epoch: int) -> float:
        self.recent.append(float(epoch))
        return 1.0 / (1.0 + sum(self.recent))


def test_scheduler_state_that_is_not_storable_is_refused(tmp_path: Path) -> None:
    holder = looproto.Module(name="holder")
    holder.optimizer = torch.optim.SGD(_zoo_torch.Net().parameters(), lr=0.1)
    holder.scheduler = L.LambdaLR(holder.optimizer, RecentLosses())
    with pytest.raises(
        CheckpointError,
        match=r"Cannot save 'scheduler/lr_lambdas/0/recent'.*LambdaLR.*deque",
    ):
        save(holder, tmp_path)


class Locked(L.StepLR):
    """A scheduler subclass whose `state_dict()` deep-copies a lock: it raises."""

    def __init__(self, optimizer: Any) -> None:
        self.lock = threading.Lock()
        super().__init__(optimizer, 2)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(super().state_dict())


def test_a_state_dict_that_raises_is_named(tmp_path: Path) -> None:
    holder = looproto.Module(name="holder")
    holder.optimizer = torch.optim.SGD(_zoo_torch.Net().parameters(), lr=0.1)
    holder.schedule = Locked(holder.optimizer)
    assert "optimizer/param_groups/0/lr" in variables_by_path(holder)
    with pytest.raises(CheckpointError, match=r"Cannot save 'schedule': Locked.state_dict\(\)"):
        save(holder, tmp_path)
    # Restoring into such a tree names it before anything else.
    good = looproto.Module(name="holder")
    good.optimizer = torch.optim.SGD(_zoo_torch.Net().parameters(), lr=0.1)
    save(good, tmp_path / "good")
    with pytest.raises(CheckpointError, match=r"Cannot restore into 'schedule'"):
        looproto.CheckpointManager(tmp_path / "good", holder).restore(1)


def test_scheduler_flags_and_strings_go_to_the_json_item(tmp_path: Path) -> None:
    holder = looproto.Module(name="holder")
    holder.optimizer = torch.optim.Adam(_zoo_torch.Net().parameters(), lr=0.1, maximize=True)
    holder.scheduler = L.ReduceLROnPlateau(holder.optimizer, mode="max", threshold_mode="abs")
    save(holder, tmp_path)
    objects = looproto.checkpoint.read_metadata(tmp_path)["objects"]
    assert objects["scheduler/json"]["state"] == {"mode": "max", "threshold_mode": "abs"}
    assert objects["optimizer/json"]["state"]["param_groups/0/maximize"] is True
    other = looproto.Module(name="holder")
    other.optimizer = torch.optim.Adam(_zoo_torch.Net().parameters(), lr=0.1)
    other.scheduler = L.ReduceLROnPlateau(other.optimizer)
    looproto.CheckpointManager(tmp_path, other).restore(1)
    assert other.scheduler.mode == "max" and other.scheduler.threshold_mode == "abs"
    assert other.scheduler.mode_worse == -math.inf  # Recomputed by its load_state_dict().
    assert other.optimizer.param_groups[0]["maximize"] is True


# -- bad input: a checkpoint written before a state kind was captured --------------------------


class Before(_zoo_torch.Trainer):
    """The trainer as it was when the checkpoint was written."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.Adam(self.model.named_parameters(), lr=0.01)

    def after_step(self, loss: Any) -> None:
        pass


class After(Before):
    """The trainer now: a scheduler and a scaler that the checkpoint does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = L.StepLR(self.optimizer, 2, 0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)


def test_missing_state_is_named_with_the_way_forward(tmp_path: Path) -> None:
    before = Before()
    before.train(3)
    save(before, tmp_path, step=3)
    after = After()
    untouched = {p: variable_to_numpy(v) for p, v in variables_by_path(after).items()}
    with pytest.raises(CheckpointError, match="allow_missing") as info:
        looproto.CheckpointManager(tmp_path, after).restore(3)
    message = str(info.value)
    for path in ("scaler/scale", "scaler/growth_tracker", "scheduler/last_epoch"):
        assert f"'{path}': not in the checkpoint" in message
    assert "'scheduler/json': object state not in the checkpoint" in message
    for path, value in variables_by_path(after).items():  # Nothing was restored.
        np.testing.assert_array_equal(variable_to_numpy(value), untouched[path])

    assert "'optimizer/param_groups/0/initial_lr': not in the checkpoint" in message
    patterns = ["scaler/*", "scheduler/*", "optimizer/param_groups/*/initial_lr"]
    looproto.CheckpointManager(tmp_path, after).restore(3, allow_missing=patterns)
    for path, value in variables_by_path(before).items():
        np.testing.assert_array_equal(
            variable_to_numpy(variables_by_path(after)[path]), variable_to_numpy(value)
        )
    assert after.scaler.get_scale() == 1024.0 and after.scheduler.last_epoch == 0  # Fresh.
    assert len(after.optimizer.state) == 6  # Adam's state was created by the restore.
    with pytest.raises(ConfigError, match="allow_missing"):
        looproto.CheckpointManager(tmp_path, after, allow_missing="scaler/*")  # type: ignore[arg-type]


class NewHead(Before):
    """The trainer with a layer more: its parameters and their Adam state are new."""

    def make_model(self) -> Any:
        model = _zoo_torch.Net()
        model.head = torch.nn.Linear(1, 1)
        return model


def test_allow_missing_on_the_manager_restores_the_rest_whole(tmp_path: Path) -> None:
    before = Before()
    before.train(4)
    save(before, tmp_path, step=4)
    grown = NewHead()
    patterns = ["model/head/*", "optimizer/state/head/*"]
    with looproto.CheckpointManager(tmp_path, grown, allow_missing=patterns) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "4")
    state = grown.optimizer.state
    assert len(state) == 6  # Every checkpointed parameter's Adam state, committed whole.
    for name, param in grown.model.named_parameters():
        if name.startswith("head."):
            assert param not in state  # No checkpointed state: starts afresh.
        else:
            np.testing.assert_array_equal(
                state[param]["exp_avg"].numpy(),
                before.optimizer.state[dict(before.model.named_parameters())[name]][
                    "exp_avg"
                ].numpy(),
            )
