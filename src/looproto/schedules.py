"""Learning-rate schedules written against the Python array API: the same on every backend.

A schedule is a callable of the update count -- the number of updates an optimizer
has applied before this one -- returning the learning rate of this update. Inside a
compiled step the count is the backend's array (a `looproto.Variable` the optimizer
keeps), so the schedule runs as the framework's own ops (`jax.jit`, `torch.compile`,
`tf.function`); on the host, with a Python int, it gives a NumPy float. Pass one as
the `learning_rate` of a `looproto.portable` optimizer::

    schedule = schedules.cosine_decay(peak=1e-3, decay_steps=10_000, warmup_steps=500)
    optimizer = portable.Adam(model, learning_rate=schedule, weight_decay=1e-4)

They follow optax's definitions (`optax.warmup_cosine_decay_schedule`, ...), so a
portable model and an optax one given the same numbers see the same rates.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from looproto.errors import ConfigError, value_repr
from looproto.portable import array_namespace

__all__ = ["Schedule", "cosine_decay", "linear", "piecewise_constant"]


def _number(value: Any, argument: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"`{argument}` must be a finite number; received {value_repr(value)}.")
    if positive and value <= 0:
        raise ConfigError(f"`{argument}` must be > 0; received {value_repr(value)}.")
    return float(value)


def _count(value: Any, argument: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        expected = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"`{argument}` must be an int {expected}; received {value_repr(value)}.")
    return value


class Schedule(abc.ABC):
    """A learning rate by update count: `schedule(count)` on host ints or any backend's arrays."""

    def __call__(self, count: Any) -> Any:
        """The learning rate of the update after `count` earlier ones (float32)."""
        if isinstance(count, (int, np.integer)):
            count = np.asarray(count)
        xp = array_namespace(count)
        return self.value(xp, xp.astype(xp.asarray(count), xp.float32))

    @abc.abstractmethod
    def value(self, xp: Any, t: Any) -> Any:
        """The rate at float32 count `t`, with the array namespace `xp`."""


class _Linear(Schedule):
    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start, self.end, self.steps = start, end, steps

    def value(self, xp: Any, t: Any) -> Any:
        fraction = xp.clip(t / self.steps, 0.0, 1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return f"linear(start={self.start}, end={self.end}, steps={self.steps})"


def linear(start: float, end: float, steps: int) -> Schedule:
    """From `start` to `end` over `steps` updates, then `end` (optax's `linear_schedule`).

    Example:
        >>> schedule = linear(0.0, 1.0, steps=4)
        >>> [float(schedule(t)) for t in (0, 2, 4, 9)]
        [0.0, 0.5, 1.0, 1.0]
    """
    return _Linear(_number(start, "start"), _number(end, "end"), _count(steps, "steps"))


class _Cosine(Schedule):
    def __init__(self, peak: float, decay_steps: int, end: float, warmup: int, init: float):
        self.peak, self.decay_steps, self.end, self.warmup, self.init = (
            peak,
            decay_steps,
            end,
            warmup,
            init,
        )

    def value(self, xp: Any, t: Any) -> Any:
        span = max(self.decay_steps - self.warmup, 1)
        fraction = xp.clip((t - self.warmup) / span, 0.0, 1.0)
        cosine = self.end + (self.peak - self.end) * 0.5 * (1.0 + xp.cos(math.pi * fraction))
        if not self.warmup:
            return cosine
        warm = self.init + (self.peak - self.init) * xp.clip(t / self.warmup, 0.0, 1.0)
        return xp.where(t < self.warmup, warm, cosine)

    def __repr__(self) -> str:
        return (
            f"cosine_decay(peak={self.peak}, decay_steps={self.decay_steps}, end={self.end}, "
            f"warmup_steps={self.warmup}, init={self.init})"
        )


def cosine_decay(
    peak: float,
    decay_steps: int,
    end: float = 0.0,
    *,
    warmup_steps: int = 0,
    init: float = 0.0,
) -> Schedule:
    """A linear warm-up from `init` to `peak`, then a cosine decay to `end`.

    `decay_steps` counts the warm-up too (optax's `warmup_cosine_decay_schedule`);
    after it the rate stays at `end`.

    Example:
        >>> schedule = cosine_decay(peak=1.0, decay_steps=10, warmup_steps=2)
        >>> [round(float(schedule(t)), 4) for t in (0, 1, 2, 6, 10, 20)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]

    Raises:
        ConfigError: `decay_steps` is not above `warmup_steps`, or a number is invalid.
    """
    decay = _count(decay_steps, "decay_steps")
    warmup = _count(warmup_steps, "warmup_steps", allow_zero=True)
    if warmup >= decay:
        raise ConfigError(
            f"`decay_steps` ({decay}) must be larger than `warmup_steps` ({warmup}): it counts "
            "the warm-up too."
        )
    return _Cosine(_number(peak, "peak"), decay, _number(end, "end"), warmup, _number(init, "init"))


class _Piecewise(Schedule):
    def __init__(self, boundaries: tuple[int, ...], values: tuple[float, ...]) -> None:
        self.boundaries, self.values = boundaries, values

    def value(self, xp: Any, t: Any) -> Any:
        rate = self.values[0] + 0.0 * t
        for boundary, before, after in zip(self.boundaries, self.values, self.values[1:]):
            rate = rate + xp.astype(t >= boundary, xp.float32) * (after - before)
        return rate

    def __repr__(self) -> str:
        return f"piecewise_constant(boundaries={list(self.boundaries)}, values={list(self.values)})"


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """`values[i]` from update `boundaries[i-1]` on (`values[0]` before the first).

    Example:
        >>> schedule = piecewise_constant([3, 6], [1.0, 0.5, 0.25])
        >>> [float(schedule(t)) for t in (0, 2, 3, 6)]
        [1.0, 1.0, 0.5, 0.25]

    Raises:
        ConfigError: `values` is not one longer than `boundaries`, or the boundaries do
            not increase.
    """
    bounds = tuple(_count(b, "boundaries", allow_zero=True) for b in boundaries)
    rates = tuple(_number(v, "values") for v in values)
    if len(rates) != len(bounds) + 1:
        raise ConfigError(
            f"`values` must have one more entry than `boundaries`; received {len(rates)} values "
            f"for {len(bounds)} boundaries."
        )
    if any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ConfigError(f"`boundaries` must increase; received {list(bounds)}.")
    return _Piecewise(bounds, rates)
