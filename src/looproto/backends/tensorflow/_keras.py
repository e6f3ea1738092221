"""Keras 3 objects in a module tree: paths by attribute, and optimizers built on restore.

A Keras layer or model, optimizer, metric or `SeedGenerator` held by a `Module` is
walked like a `tf.Module`: by the attributes that hold its variables and sub-objects
(`dense/kernel`, `encoder/blocks/0/kernel`, `dropout/seed_generator/state`,
`optimizer/momentums/0`), never by Keras' own variable paths, whose names Keras makes
unique per process (`sequential_2/dense_2/kernel`), so that a model rebuilt in the same
process matches its own checkpoint. What no attribute names falls back to its index in
Keras' own tracking lists (`layers/0` for a `Sequential`'s layers). Everything in the
object's `variables` is found: a `Dropout`'s `SeedGenerator` state, a metric's totals,
an optimizer's `iterations`.

A Keras optimizer creates its slots (`momentums`, `velocities`, ...) lazily, at its
first `apply`. Its checkpoint therefore also records, as a JSON state at `built_for`,
which variables of the tree it was built for (references to their paths); on restore,
that state is set before the checkpoint is compared with the live tree
(`restore_first`), and an optimizer not built yet is built for those variables, so its
slots exist to receive the saved values.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

from looproto.errors import CheckpointError

__all__ = [
    "TF_KERAS_OPTIMIZER",
    "KerasOptimizerBuild",
    "is_keras_object",
    "is_tf_keras_optimizer",
    "keras_pairs",
]

TF_KERAS_OPTIMIZER = (
    "a `tf_keras` (Keras 2) optimizer keys its slots by variable ids and builds them "
    "lazily, so looproto cannot checkpoint it. Use a Keras 3 optimizer "
    "(`keras.optimizers`), whose state looproto saves whole, or keep this one out of the "
    "checkpointed tree and accept that a resumed run starts it afresh."
)

_Pairs = list[tuple[tuple[Any, ...], Any]]

# Attributes holding Keras' own bookkeeping: lists of what other attributes hold
# (walked only for what no attribute names), graph nodes pointing at other layers, the
# variables an optimizer trains (the model's), and `compile()`'s metrics, used by `fit`.
_BOOKKEEPING = frozenset(
    {
        "_layers",
        "_trainable_variables",
        "_non_trainable_variables",
        "_seed_generators",
        "_metrics",
        "_variables",
        "_tracked",
        "_tracker",
        "_functional",
        "_operations",
        "_inbound_nodes",
        "_outbound_nodes",
        "_trainable_variables_indices",
        "_self_unconditional_checkpoint_dependencies",
        "_self_unconditional_dependency_names",
        "_self_unconditional_deferred_dependencies",
        "_self_saveable_object_factories",
        "_compile_metrics",
        "_compile_loss",
        "_loss_tracker",
        "_distribution_strategy",
        "_build_shapes_dict",
        "_call_signature",
        "_call_context_args",
        "_call_has_context_arg",
        "call_signature_parameters",
        "_loss_ids",
        "_losses",
        "_losses_override",
        "_dtype_policy",
        "_auto_config",
    }
)


def _kinds(keras: Any) -> tuple[type, ...]:
    return (
        keras.layers.Layer,
        keras.optimizers.Optimizer,
        keras.metrics.Metric,
        keras.random.SeedGenerator,
    )


def is_keras_object(obj: Any, keras: Any) -> bool:
    """A Keras layer (model), optimizer, metric or `SeedGenerator`."""
    return isinstance(obj, _kinds(keras))


def is_tf_keras_optimizer(obj: Any) -> bool:
    """A `tf_keras` optimizer (new or legacy): state looproto cannot checkpoint."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is None:
        return False
    optimizers = tf_keras.optimizers
    kinds = [getattr(optimizers, "Optimizer", None)]
    legacy = getattr(optimizers, "legacy", None)
    kinds.append(getattr(legacy, "Optimizer", None))
    return isinstance(obj, tuple(k for k in kinds if isinstance(k, type)))


# Attribute values that are never state, skipped before any other check (a model's
# walk visits every attribute of every layer: most are these).
_ATOMS = (str, bytes, bool, int, float, type(None), types.FunctionType, types.MethodType, type)


def _contents(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """`(path, leaf)` inside lists, tuples and dicts (Keras' tracked ones too)."""
    if isinstance(value, _ATOMS):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _contents(item, (*path, index))
    elif isinstance(value, dict):
        try:
            keys = sorted(value)
        except TypeError:
            return
        for key in keys:
            yield from _contents(value[key], (*path, key))
    else:
        yield path, value


class _Walk:
    def __init__(self, keras: Any, variable_types: tuple[type, ...]) -> None:
        self.keras = keras
        self.kinds = _kinds(keras)
        self.variable_types = variable_types
        self.pairs: _Pairs = []
        self.seen: set[int] = set()

    def add(self, path: tuple[Any, ...], leaf: Any) -> None:
        if id(leaf) not in self.seen:
            self.seen.add(id(leaf))
            self.pairs.append((path, leaf))

    def visit(self, obj: Any, prefix: tuple[Any, ...], inner: bool = False) -> None:
        keras = self.keras
        if isinstance(obj, keras.random.SeedGenerator):
            self.add((*prefix, "state"), obj.state)
            return
        children: list[tuple[tuple[Any, ...], Any]] = []
        # Public attributes first: their names win over private ones for a shared object.
        attributes = vars(obj)
        names = sorted(attributes)
        for name in [n for n in names if n[0] != "_"] + [n for n in names if n[0] == "_"]:
            # `_self_*`: TensorFlow's tracking of the same objects.
            if name in _BOOKKEEPING or name.startswith("_self_"):
                continue
            value = attributes[name]
            if isinstance(value, _ATOMS):
                continue
            element = name.lstrip("_") or name
            for sub, leaf in _contents(value, (element,)):
                if id(leaf) in self.seen:
                    continue
                if isinstance(leaf, self.variable_types):
                    self.add((*prefix, *sub), leaf)
                elif isinstance(leaf, self.kinds):
                    self.seen.add(id(leaf))
                    children.append((sub, leaf))
        # What Keras tracks but no attribute names: by index in its tracking lists.
        for listing, element in (("_layers", "layers"), ("_seed_generators", "seed_generators")):
            tracked = getattr(obj, listing, None) or []
            if element == "layers" and isinstance(obj, keras.Model):
                tracked = obj.layers  # `model.layers[i]` (no `InputLayer`)
            for index, child in enumerate(tracked):
                if id(child) not in self.seen:
                    self.seen.add(id(child))
                    children.append(((element, index), child))
        for sub, child in children:
            self.visit(child, (*prefix, *sub), inner=isinstance(obj, keras.optimizers.Optimizer))
        if isinstance(obj, keras.optimizers.Optimizer) and not inner:
            # An optimizer inside another (a `LossScaleOptimizer`'s) is built by it.
            self.add((*prefix, "built_for"), KerasOptimizerBuild(obj))
        rest = [v for v in getattr(obj, "variables", ()) if id(v) not in self.seen]
        for index, variable in enumerate(rest):  # None known: left by no attribute or list.
            self.add((*prefix, "variables", index), variable)


def keras_pairs(obj: Any, keras: Any, variable_types: tuple[type, ...]) -> _Pairs:
    """`(path, leaf)` pairs of a Keras object's state (see the module docstring).

    `variable_types`: what is a variable here (Keras' and the framework's own).
    """
    walk = _Walk(keras, variable_types)
    walk.visit(obj, ())
    return walk.pairs


class KerasOptimizerBuild:
    """Which variables a Keras optimizer was built for: a JSON state set before a restore.

    Its state is `{"variables": [...]}`, the variables of the optimizer's first `apply`
    (the checkpoint stores references to their paths), or None while it is not built.
    """

    __slots__ = ("_optimizer",)
    restore_first = True  # Building creates the slots that the restore then fills.

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    def get_state(self) -> dict[str, Any]:
        """The variables the optimizer was built for, or None."""
        if not self._optimizer.built:
            return {"variables": None}
        return {"variables": list(self._optimizer._trainable_variables)}

    def set_state(self, state: Any) -> None:
        """Builds the optimizer for the saved variables; checks a built one has them."""
        variables = state.get("variables") if isinstance(state, dict) else state
        optimizer = self._optimizer
        if variables is None:
            return  # Saved before its first step: a built one is refused by the tree check.
        if not optimizer.built:
            # Under the strategy the optimizer was made in, as its first `apply` would be.
            strategy = getattr(optimizer, "_distribution_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                optimizer.build(list(variables))
            return
        live = [id(v) for v in optimizer._trainable_variables]
        if live != [id(v) for v in variables]:
            raise CheckpointError(
                f"The Keras optimizer {optimizer.name!r} was built for other variables than "
                "the checkpoint's (or in another order); build it for the same variables "
                "(`optimizer.build(model.trainable_variables)`), or restore before its "
                "first step."
            )
