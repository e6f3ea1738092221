"""What `looproto.metrics` and `LearningRateMonitor` ask of torch objects.

* `hyperparameters`: a `torch.optim.Optimizer`'s param groups (a learning-rate
  scheduler stands for its optimizer), under looproto's names: `lr` is
  `learning_rate`, `betas` are `beta_1` and `beta_2`. A scheduler stepped after
  `optimizer.step()` has already written the next step's values into the groups.
* `metric_adapter`: a torchmetrics `Metric` or `MetricCollection`, reset with its own
  `reset()` and read with `compute()` (which syncs it over the process group).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from looproto.backends._common import ComputeMetricAdapter

__all__ = ["hyperparameters", "metric_adapter"]

# torch's param-group keys -> looproto's names (the same on every backend).
_NAMES = {"lr": "learning_rate", "momentum": "momentum", "weight_decay": "weight_decay"}


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().cpu())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def hyperparameters(obj: Any) -> dict[str, float] | None:
    """See `looproto.backends.SupportsHyperparameters`."""
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        obj = obj.optimizer
    if not isinstance(obj, torch.optim.Optimizer):
        return None
    out: dict[str, float] = {}
    for index, group in enumerate(obj.param_groups):
        suffix = f"/group_{index}" if index else ""
        for key, name in _NAMES.items():
            value = _number(group.get(key))
            if value is not None:
                out[name + suffix] = value
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            for name, beta in zip(("beta_1", "beta_2"), betas):
                value = _number(beta)
                if value is not None:
                    out[name + suffix] = value
    return out


def metric_adapter(obj: Any) -> ComputeMetricAdapter | None:
    """See `looproto.backends.SupportsMetrics`: torchmetrics metrics, if it is imported."""
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return None
    if isinstance(obj, (torchmetrics.Metric, torchmetrics.MetricCollection)):
        return ComputeMetricAdapter(obj)
    return None
