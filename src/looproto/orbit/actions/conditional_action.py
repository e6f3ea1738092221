"""Orbit's `ConditionalAction`: `looproto.actions.ConditionalAction`."""

from looproto.actions import Condition as Condition
from looproto.actions import ConditionalAction as ConditionalAction

__all__ = ["Condition", "ConditionalAction"]
