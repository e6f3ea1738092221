"""Factories for the `looproto` command's tests, each wrong (or slow) in one way.

Named in configs as `tests.run_factories:<name>`; the command imports them from the
repository root, which it puts on the import path.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import looproto
from looproto.examples import mlp
from tests.helpers import TestRunner


class _TextStep(looproto.StandardTrainer):
    def __init__(self) -> None:
        super().__init__(train_dataset=None)
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> str:
        self.global_step.assign_add(1)
        return "done"


def text_step() -> Any:
    """A trainer whose `train_step` returns a string."""
    return _TextStep()


def returns_none() -> None:
    """A trainer factory that forgets its `return`."""


def raises() -> Any:
    raise RuntimeError("the data bucket is not reachable")


def missing_data() -> Any:
    """A factory whose data file is not there."""
    with open("/nonexistent/looproto/train.npz", "rb") as f:
        return f.read()


class _NoTrain:
    def __init__(self) -> None:
        self.global_step = looproto.create_global_step()


def no_train() -> Any:
    """Something with a global step but no `train()`."""
    return _NoTrain()


def float_step() -> Any:
    """A trainer whose global step is a float variable."""
    trainer = TestRunner()
    trainer.global_step = looproto.Variable(np.float32(0))
    return trainer


class _FiniteData(TestRunner):
    def __init__(self) -> None:
        super().__init__(epochs=1)  # 100 batches, then the data ends


def finite_data() -> Any:
    """Trainer and evaluator in one, with 100 training batches."""
    return _FiniteData()


def same(trainer: Any) -> Any:
    return trainer


def slow_start(backend: str, seed: int = 0, delay: float = 2.0) -> Any:
    """The MLP trainer, built after saying so on stderr and a pause (start-up signals)."""
    print("factory: building", file=sys.stderr, flush=True)
    time.sleep(delay)
    return mlp.trainer(backend, seed=seed)
