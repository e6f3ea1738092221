"""`SummarySlots`: what a TensorFlow step records with `looproto.summary`, kept on device.

A compiled step's values are graph tensors, which cannot leave the `tf.function`; each
name recorded gets a `tf.Variable` slot instead (created when the step is first
traced, as Keras builds its layers' variables), assigned at every step. After the
loop, the slots' values are handed to the host (`looproto.summary`'s pending store).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from looproto import _recording
from looproto.errors import ProtocolError


class SummarySlots:
    """The recorder a `TensorflowLoop` installs while its steps run or are traced."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[str, tf.Variable]] = {}

    @tf.autograph.experimental.do_not_convert
    def record(self, kind: str, name: str, value: Any) -> None:
        """Assigns this step's `value` to the slot of `name` (created on first use)."""
        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ProtocolError(
                f"`looproto.summary.{kind}({name!r}, ...)` was called in a step running on "
                "several replicas of a `tf.distribute` strategy, where each replica has its "
                "own value. Reduce it across the replicas and return it from the step or "
                "from `train_loop_end` instead."
            )
        tensor = tf.convert_to_tensor(value)
        entry = self._slots.get(name)
        if entry is None:
            # A fully known shape keeps the slot usable under XLA; otherwise any shape.
            shape = tensor.shape if tensor.shape.is_fully_defined() else tf.TensorShape(None)
            with tf.init_scope():  # created eagerly, even while a step is traced
                slot = tf.Variable(
                    tf.zeros(shape if shape.is_fully_defined() else (), tensor.dtype),
                    shape=shape,
                    trainable=False,
                    name="looproto_summary",
                )
            entry = self._slots[name] = (kind, slot)
        entry[1].assign(tensor)

    def deliver(self) -> None:
        """Hands the latest value of every slot to the host."""
        if self._slots:
            _recording.deliver(
                {name: (kind, slot.read_value()) for name, (kind, slot) in self._slots.items()}
            )
