"""Metrics accumulated over an inner loop or an evaluation, the same on every backend.

A metric keeps its state in `looproto.Variable`s, so it is state like any other: the
backends lift it into their compiled loops (into the `jax.jit` call, onto the torch
device, into `tf.Variable` twins), checkpoints save it, and `result()` merges it over
the processes of a multi-process run. `update` runs inside a step and is written
against the Python array API, so the same metric runs under every backend;
`result()` runs on the host::

    class Trainer(looproto.StandardTrainer):
        def __init__(self, ...):
            ...
            self.train_metrics = {"loss": metrics.Mean(), "accuracy": metrics.Accuracy()}

        def train_step(self, iterator):
            ...
            self.train_metrics["loss"].update(loss)
            self.train_metrics["accuracy"].update(labels, logits)

A `StandardTrainer`'s `train_metrics` (a `StandardEvaluator`'s `eval_metrics`) are
reset before each inner loop (evaluation) and their results are added to the output
of `train()` (`evaluate()`), which the `Controller` logs, summarises and hands to its
actions. Metrics a program already has from its framework -- torchmetrics metrics,
Keras metrics, Flax NNX metrics -- go in the same mapping: their own `reset` and
`compute`/`result` are called (the backend of their framework knows how,
`looproto.backends.SupportsMetrics`), and their framework merges them over
processes its own way.

Over several processes: a metric's state is summed (or min'd, max'd, averaged, as
each state says) over the processes when its values are per-process, as under
torch's DistributedDataParallel; under JAX's global mesh every process already
computes the global value, and nothing is merged. `sync` overrides this per metric.
(Under a multi-replica TensorFlow strategy looproto's Variables are not lifted into
the replicas' steps: use Keras metrics or `tf.Variable`s with an `aggregation` there.)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import numpy as np

from looproto import _nest, backends, distributed
from looproto.backends.base import MetricAdapter, SupportsGlobalValues, SupportsMetrics
from looproto.errors import ConfigError, ProtocolError, value_repr
from looproto.module import Module, Variable, variable_to_numpy
from looproto.portable import array_namespace

__all__ = [
    "Accuracy",
    "Last",
    "Max",
    "Mean",
    "Metric",
    "Min",
    "Sum",
    "adapt",
    "reset",
    "results",
]

_REDUCTIONS: Final = ("sum", "min", "max", "mean")


def _float_dtype(dtype: Any) -> np.dtype[Any]:
    resolved: np.dtype[Any] = np.dtype(dtype)
    if resolved.kind != "f":
        raise ConfigError(
            f"`dtype` must be a floating-point dtype; received dtype={value_repr(dtype)}."
        )
    return resolved


class Metric(Module, metaclass=abc.ABCMeta):
    """A metric whose state is `looproto.Variable`s: updated in steps, read on the host.

    Subclasses declare their state in `__init__` with `add_state`, fold a step's
    values into it in `update` (array-API code: it runs inside compiled steps), and
    compute the result from the merged state in `compute` (NumPy, on the host).

    Args:
        name: The module name (its state Variables are named under it).
        dtype: The floating-point dtype of the state.
        sync: Merge the state over the processes of a multi-process run in
            `result()`: True always, False never, None (default) when the backend's
            steps compute per-process values (see the module docstring).

    Raises:
        ConfigError: `dtype` is not a floating-point dtype, or `sync` not a bool or None.
    """

    _TF_MODULE_IGNORED_PROPERTIES: ClassVar[frozenset[str]] = frozenset({"_initial"})

    def __init__(
        self, name: str | None = None, *, dtype: Any = np.float32, sync: bool | None = None
    ) -> None:
        super().__init__(name=name)
        if sync is not None and not isinstance(sync, bool):
            raise ConfigError(f"`sync` must be a bool or None; received sync={value_repr(sync)}.")
        self.dtype = _float_dtype(dtype)
        self.sync = sync
        self._initial: dict[str, tuple[np.ndarray[Any, Any], str]] = {}

    def add_state(self, name: str, initial: Any, reduction: str = "sum") -> Variable:
        """Creates the state Variable `name` (also set as an attribute) at `initial`.

        Args:
            name: The attribute name.
            initial: Its value after `reset()` (cast to the metric's `dtype`).
            reduction: How processes' values merge: "sum", "min", "max" or "mean".
        """
        if reduction not in _REDUCTIONS:
            raise ConfigError(
                f"`reduction` must be one of {list(_REDUCTIONS)}; received {reduction!r}."
            )
        value = np.asarray(initial, dtype=self.dtype)
        with self.name_scope:
            variable = Variable(value.copy(), trainable=False, name=name)
        setattr(self, name, variable)
        self._initial[name] = (value, reduction)
        return variable

    def reset(self) -> None:
        """Puts every state Variable back to its initial value (on the host)."""
        for name, (initial, _) in self._initial.items():
            getattr(self, name).assign(initial)

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Folds one step's values into the state (array-API code, runs inside steps)."""

    @abc.abstractmethod
    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """The result from the (merged) state, as NumPy values."""

    def state(self) -> dict[str, np.ndarray[Any, Any]]:
        """This process's state, as host NumPy arrays."""
        return {name: variable_to_numpy(getattr(self, name)) for name in self._initial}

    def result(self) -> Any:
        """The result over everything since `reset()` (merged over processes, see `sync`)."""
        return results({self.name: self})[self.name]

    def merge(self, states: list[Mapping[str, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Merges several processes' states by each state's reduction."""
        merged: dict[str, np.ndarray[Any, Any]] = {}
        for name, (_, reduction) in self._initial.items():
            stacked = np.stack([np.asarray(s[name], dtype=self.dtype) for s in states])
            merged[name] = np.asarray(getattr(np, reduction)(stacked, axis=0), dtype=self.dtype)
        return merged

    # -- helpers for `update` ---------------------------------------------------

    def _namespace(self) -> Any:
        """The array namespace of the state: the running backend's inside a loop."""
        first = next(iter(self._initial))
        return array_namespace(getattr(self, first))

    def _values(self, xp: Any, values: Any) -> Any:
        """`values` as an array of the state's namespace and dtype."""
        like = getattr(self, next(iter(self._initial))).value
        return xp.astype(xp.asarray(values), like.dtype)

    def _weighted(self, xp: Any, values: Any, sample_weight: Any) -> tuple[Any, Any]:
        """`(sum of weighted values, sum of weights)` for one update."""
        if sample_weight is None:
            return xp.sum(values), float(math.prod(values.shape))
        weights = xp.broadcast_to(self._values(xp, sample_weight), values.shape)
        return xp.sum(values * weights), xp.sum(weights)


class Mean(Metric):
    """The (weighted) mean of every value given to `update` since `reset()`.

    Example:
        >>> mean = Mean()
        >>> mean.update(np.array([1.0, 2.0]))
        >>> mean.update(np.array([6.0]), sample_weight=np.array([2.0]))
        >>> float(mean.result())  # (1 + 2 + 2 * 6) / (1 + 1 + 2)
        3.75

    The result of no values is NaN.
    """

    def __init__(
        self, name: str | None = None, *, dtype: Any = np.float32, sync: bool | None = None
    ) -> None:
        super().__init__(name, dtype=dtype, sync=sync)
        self.total = self.add_state("total", 0.0)
        self.count = self.add_state("count", 0.0)

    def update(self, values: Any, sample_weight: Any = None) -> None:
        """Adds `values` (an array or a number), each weighted by `sample_weight`."""
        xp = self._namespace()
        total, count = self._weighted(xp, self._values(xp, values), sample_weight)
        self.total.assign_add(total)
        self.count.assign_add(count)

    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """See base class."""
        count = state["count"]
        return state["total"] / count if count else self.dtype.type(np.nan)


class Sum(Metric):
    """The sum of every value given to `update` since `reset()`."""

    def __init__(
        self, name: str | None = None, *, dtype: Any = np.float32, sync: bool | None = None
    ) -> None:
        super().__init__(name, dtype=dtype, sync=sync)
        self.total = self.add_state("total", 0.0)

    def update(self, values: Any, sample_weight: Any = None) -> None:
        """Adds the sum of `values` (each weighted by `sample_weight`)."""
        xp = self._namespace()
        total, _ = self._weighted(xp, self._values(xp, values), sample_weight)
        self.total.assign_add(total)

    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """See base class."""
        return state["total"]


class Accuracy(Metric):
    """The fraction of predictions that match their labels.

    `update(labels, predictions)` takes integer class labels and either scores with
    one more (last) axis than the labels -- logits or probabilities, compared by
    their argmax -- or predictions of the labels' shape: class ids, or, with
    `threshold`, binary scores (`prediction > threshold` is class 1).

    Example:
        >>> accuracy = Accuracy()
        >>> logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
        >>> accuracy.update(np.array([0, 1, 1]), logits)
        >>> float(accuracy.result())
        0.6666666865348816

    Args:
        name: See `Metric`.
        threshold: For binary scores of the labels' shape.
        dtype: See `Metric`.
        sync: See `Metric`.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        threshold: float | None = None,
        dtype: Any = np.float32,
        sync: bool | None = None,
    ) -> None:
        super().__init__(name, dtype=dtype, sync=sync)
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float))
        ):
            raise ConfigError(
                f"`threshold` must be a number or None; received threshold={value_repr(threshold)}."
            )
        self.threshold = threshold
        self.correct = self.add_state("correct", 0.0)
        self.count = self.add_state("count", 0.0)

    def update(self, labels: Any, predictions: Any, sample_weight: Any = None) -> None:
        """Counts the matches of one batch (see the class docstring)."""
        xp = self._namespace()
        labels = xp.asarray(labels)
        predictions = xp.asarray(predictions)
        if predictions.ndim == labels.ndim + 1:
            predictions = xp.argmax(predictions, axis=-1)
        elif predictions.ndim != labels.ndim:
            raise ProtocolError(
                f"`Accuracy.update` takes predictions of the labels' shape {tuple(labels.shape)} "
                f"or with one more (class) axis; received shape {tuple(predictions.shape)}."
            )
        elif self.threshold is not None:
            predictions = predictions > self.threshold
        matches = self._values(xp, predictions) == self._values(xp, labels)
        correct, count = self._weighted(xp, self._values(xp, matches), sample_weight)
        self.correct.assign_add(correct)
        self.count.assign_add(count)

    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """See base class."""
        count = state["count"]
        return state["correct"] / count if count else self.dtype.type(np.nan)


class Last(Metric):
    """The last value given to `update` (over processes: their mean).

    Args:
        name: See `Metric`.
        shape: The value's shape (default: a scalar).
        dtype: See `Metric`.
        sync: See `Metric`.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        shape: tuple[int, ...] = (),
        dtype: Any = np.float32,
        sync: bool | None = None,
    ) -> None:
        super().__init__(name, dtype=dtype, sync=sync)
        self.shape = tuple(shape)
        self.value = self.add_state("value", np.zeros(self.shape), "mean")
        self.count = self.add_state("count", 0.0)

    def update(self, value: Any) -> None:
        """Keeps `value` (of the metric's shape)."""
        xp = self._namespace()
        self.value.assign(xp.reshape(self._values(xp, value), self.shape))
        self.count.assign_add(1.0)

    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """See base class."""
        return state["value"] if state["count"] else np.full(self.shape, np.nan, self.dtype)


class _Extreme(Metric):
    _reduction: ClassVar[str]

    def __init__(
        self, name: str | None = None, *, dtype: Any = np.float32, sync: bool | None = None
    ) -> None:
        super().__init__(name, dtype=dtype, sync=sync)
        start = np.inf if self._reduction == "min" else -np.inf
        self.value = self.add_state("value", start, self._reduction)
        self.count = self.add_state("count", 0.0)

    def update(self, values: Any) -> None:
        """Folds in the smallest (largest) of `values`."""
        xp = self._namespace()
        values = self._values(xp, values)
        if self._reduction == "min":
            self.value.assign(xp.minimum(self.value.value, xp.min(values)))
        else:
            self.value.assign(xp.maximum(self.value.value, xp.max(values)))
        self.count.assign_add(float(math.prod(values.shape)))

    def compute(self, state: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        """See base class."""
        return state["value"] if state["count"] else self.dtype.type(np.nan)


class Min(_Extreme):
    """The smallest value given to `update` since `reset()` (NaN if none)."""

    _reduction = "min"


class Max(_Extreme):
    """The largest value given to `update` since `reset()` (NaN if none)."""

    _reduction = "max"


# ----------------------------------------------------------------------------
# Tables of metrics: looproto's and the frameworks'


def adapt(metric: Any) -> Metric | MetricAdapter:
    """`metric` itself (a looproto `Metric`), or an adapter for a framework's metric.

    Raises:
        ProtocolError: No backend knows `metric` as a metric.
    """
    if isinstance(metric, Metric):
        return metric
    for backend in backends.for_object(metric):
        if isinstance(backend, SupportsMetrics):
            adapter = backend.metric_adapter(metric)
            if adapter is not None:
                return adapter
    raise ProtocolError(
        f"{value_repr(metric)} of type {type(metric).__module__}.{type(metric).__qualname__} "
        "is not a metric looproto knows: expected a `looproto.metrics.Metric`, a torchmetrics "
        "metric, a Keras metric (Keras on TensorFlow) or a Flax NNX metric."
    )


def _named(metrics: Any, argument: str) -> Mapping[str, Any]:
    """A mapping of names to metrics; a list of metrics is named by their `name`s."""
    if isinstance(metrics, Mapping):
        return metrics
    if isinstance(metrics, (list, tuple)):
        # Orbit-style trainers (TensorFlow Models) keep a list of Keras metrics.
        named: dict[Any, Any] = {getattr(metric, "name", None): metric for metric in metrics}
        if all(isinstance(name, str) for name in named) and len(named) == len(metrics):
            return named
    raise ConfigError(
        f"`{argument}` must be a mapping of names to metrics (or a list of metrics with "
        f"distinct `name`s); received {value_repr(metrics)}."
    )


def _table(metrics: Any, argument: str) -> dict[str, Metric | MetricAdapter]:
    metrics = _named(metrics, argument)
    table: dict[str, Metric | MetricAdapter] = {}
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"The names in `{argument}` must be non-empty strings; received {name!r}."
            )
        table[name] = adapt(metric)
    return table


def reset(metrics: Mapping[str, Any], argument: str = "metrics") -> None:
    """Resets every metric of a mapping name -> metric (looproto's or a framework's).

    A list of metrics with distinct `name`s is accepted too (Keras metrics, looproto's).
    """
    for metric in _table(metrics, argument).values():
        metric.reset()


def _needs_sync(metric: Metric) -> bool:
    if distributed.process_count() < 2:
        return False
    if metric.sync is not None:
        return metric.sync
    engine = distributed.engine()
    return not (isinstance(engine, SupportsGlobalValues) and engine.values_are_global())


def results(metrics: Mapping[str, Any], argument: str = "metrics") -> dict[str, Any]:
    """The results of a mapping name -> metric, as NumPy values (nested for collections).

    looproto metrics that need it are merged over the processes in one exchange;
    the frameworks' own metrics merge themselves (torchmetrics syncs in `compute()`).
    Every process must call it at the same point of the run.
    """
    table = _table(metrics, argument)
    own = {name: m for name, m in table.items() if isinstance(m, Metric)}
    synced = [name for name, m in own.items() if _needs_sync(m)]
    states = {name: own[name].state() for name in own}
    if synced:
        payload = {name: {k: v.tolist() for k, v in states[name].items()} for name in synced}
        gathered = distributed.all_gather(payload, f"the results of metrics {sorted(synced)}")
        for name in synced:
            states[name] = own[name].merge([process[name] for process in gathered])
    out: dict[str, Any] = {}
    for name, metric in table.items():
        if isinstance(metric, Metric):
            out[name] = metric.compute(states[name])
        else:
            out[name] = _nest.map_output(_nest.to_numpy_leaf, metric.result())
    return out
