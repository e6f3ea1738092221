"""No stale reads: a traced TensorFlow step reads only Variables its loop lifted.

The loop lifts the NumPy `looproto.Variable`s of its trainer or evaluator into
`tf.Variable` twins (`_lifting.py`): a compiled step reads the twin, and sees each
step's value. A NumPy Variable the loop did not lift -- reached through a closure
(`self.predict = lambda x: x @ trainer.w.value`), a global or another trainer -- would
be read once, at trace time, and become a constant of the graph: the function would
go on computing with that value forever. While the loop traces its step, a read hook
(`looproto.backends.read_hooks`, called by `Variable.value`) raises `StaleReadError`
for such a read inside the function being built. (`tf.Variable`s are captured by
reference and never go stale.) The hook is installed only while some thread traces.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from looproto.backends._common import TracingReadCheck
from looproto.errors import StaleReadError
from looproto.module import TreeVariable, Variable


def _check_read(variable: Variable, context: tuple[str, int]) -> None:
    if not tf.inside_function():
        return
    step, replicas = context
    value = variable._value
    if isinstance(value, (tf.Variable, tf.Tensor)) or tf.is_symbolic_tensor(value):
        return  # A lifted twin, or a value the step itself assigned.
    if isinstance(variable, TreeVariable):
        why = (
            "the TensorFlow backend lifts Variables holding one NumPy array, not a tree "
            "(hold each array in a `looproto.Variable` or a `tf.Variable`)"
        )
    elif replicas > 1:
        why = (
            f"the loop runs under a strategy with {replicas} replicas, where it lifts no "
            "NumPy Variables (create `tf.Variable`s under `strategy.scope()` there)"
        )
    else:
        why = (
            "the Variable is not reachable from the trainer or evaluator that runs the "
            "step (it was reached through a closure, a global or another trainer)"
        )
    raise StaleReadError(
        f"`{step}` read looproto Variable {variable.name!r} while TensorFlow traced the "
        f"compiled step, but the loop did not lift it into a `tf.Variable`: {why}. Its "
        "value now would become a constant of the graph and never change. Make it "
        "reachable: hold the module that owns it as an attribute (`self.model = "
        "trainer.model`) and read it there. To bake a value on purpose, close over a copy "
        "made outside the step (`np.array(variable.value)`)."
    )


_reads = TracingReadCheck(_check_read)


def refusing_stale_reads(step_name: str, replicas: int) -> contextlib.AbstractContextManager[None]:
    """While `step_name` is traced in this thread, reads of unlifted Variables raise."""
    return _reads.tracing((step_name, replicas))
