"""The `Trainer` and `Evaluator` protocols: the inner loop, as the `Controller` sees it.

The `Controller` owns the *outer* loop: how many steps to train in total, when to
evaluate, summarise and checkpoint. A trainer owns the *inner* loop: it is asked
to run `num_steps` steps at a time, and it is free to compile those steps into one
call of its framework. That split is Orbit's, and so are the names.

Two ways to implement it:

* structurally, any object with a `train(num_steps)` method is a `Trainer`
  (and `evaluate(num_steps)` an `Evaluator`): `isinstance(obj, Trainer)` works;
* by subclassing `AbstractTrainer` / `AbstractEvaluator`, which are `Module`s, so
  their variables are discovered and checkpointed.

`StandardTrainer` and `StandardEvaluator` (in `standard_runner.py`) implement these
with per-step hooks and a backend-compiled loop.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Protocol, Union, runtime_checkable

from looproto.module import Module

__all__ = ["AbstractEvaluator", "AbstractTrainer", "Evaluator", "Output", "Trainer"]

Output = Mapping[str, Union[Any, "Output"]]
"""A possibly nested mapping of names to arrays, tensors or numbers.

Nested mappings become nested summary directories (`{"losses": {"total": x}}`
writes tag `total` into `<summary_dir>/losses`).
"""


@runtime_checkable
class Trainer(Protocol):
    """Anything that trains for `num_steps` steps when asked."""

    def train(self, num_steps: int) -> Output | None:
        """Runs `num_steps` steps of training (the inner loop).

        Args:
            num_steps: How many steps to run. The trainer should advance the global
                step by exactly this many. `-1` means "until the data ends"; a
                trainer that runs out of data earlier stops and advances the global
                step by the steps it actually ran.

        Returns:
            None, or a (possibly nested) mapping of names to arrays/tensors/numbers,
            which the `Controller` logs, passes to train actions, and summarises.
        """
        ...


@runtime_checkable
class Evaluator(Protocol):
    """Anything that evaluates for `num_steps` steps when asked."""

    def evaluate(self, num_steps: int) -> Output | None:
        """Runs `num_steps` steps of evaluation; `-1` means until the data ends.

        Returns:
            None, or a (possibly nested) mapping of names to arrays/tensors/numbers.
        """
        ...


class AbstractTrainer(Module, metaclass=abc.ABCMeta):
    """A `Module` that is a `Trainer`: subclass it and implement `train`."""

    @abc.abstractmethod
    def train(self, num_steps: int) -> Output | None:
        """See `Trainer.train`."""


class AbstractEvaluator(Module, metaclass=abc.ABCMeta):
    """A `Module` that is an `Evaluator`: subclass it and implement `evaluate`."""

    @abc.abstractmethod
    def evaluate(self, num_steps: int) -> Output | None:
        """See `Evaluator.evaluate`."""
