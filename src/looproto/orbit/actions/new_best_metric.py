"""Orbit's `NewBestMetric` and `JSONPersistedValue`: looproto's own (`looproto.actions`)."""

from looproto.actions import JSONPersistedValue as JSONPersistedValue
from looproto.actions import MetricFn as MetricFn
from looproto.actions import NewBestMetric as NewBestMetric

__all__ = ["JSONPersistedValue", "MetricFn", "NewBestMetric"]
