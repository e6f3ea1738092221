"""Orbit's `AbstractTrainer` and `AbstractEvaluator`: the inner loop, with a tensor `num_steps`.

They are `looproto.AbstractTrainer`/`AbstractEvaluator` (so `looproto.Module`s, whose
variables of any framework are discovered and checkpointed) with Orbit's contract:
the `Controller` of this namespace passes `num_steps` as a `tf.int32` scalar tensor,
and whatever `train`/`evaluate` return is passed through.
"""

from __future__ import annotations

import abc
from typing import Any

from looproto import runner as _core

__all__ = ["AbstractEvaluator", "AbstractTrainer", "Output"]

Output = _core.Output
"""A possibly nested dict of names to tensors, NumPy values or numbers."""


class AbstractTrainer(_core.AbstractTrainer, metaclass=abc.ABCMeta):
    """A module that trains for `num_steps` steps when asked (Orbit's contract)."""

    @abc.abstractmethod
    def train(self, num_steps: Any) -> Any:
        """Runs `num_steps` steps of training.

        Args:
            num_steps: A `tf.int32` scalar tensor from `looproto.orbit.Controller`
                (an int when called otherwise). The trainer should advance the global
                step by that many.

        Returns:
            None or a (nested) dict of names to values, which the `Controller`
            logs, passes to its train actions and writes as summaries.
        """


class AbstractEvaluator(_core.AbstractEvaluator, metaclass=abc.ABCMeta):
    """A module that evaluates for `num_steps` steps when asked (Orbit's contract)."""

    @abc.abstractmethod
    def evaluate(self, num_steps: Any) -> Any:
        """Runs `num_steps` steps of evaluation (`-1`: until the data ends).

        Returns:
            None or a (nested) dict of names to values.
        """
