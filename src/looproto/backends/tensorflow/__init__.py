"""The TensorFlow backend: Orbit's `tf.function` + `tf.while_loop` inner loop.

Discovery finds `tf.Variable`s (distributed ones included), Keras 3 variables on
the TensorFlow backend, and the variables inside a `tf.Module` or a Keras layer or
model, optimizer, metric or `SeedGenerator` held as a module attribute (Keras objects by
attribute path; a lazily built Keras optimizer is built on restore, see `_keras.py`).
`Module.name_scope` enters `tf.name_scope`, so a `tf.Variable` made in a module's scope
is named like `my_module/Variable:0`.

The inner loop (`make_loop`) has three forms, picked by `LoopOptions`:

* `compile_loop` (the default): one `tf.function` whose body is
  `for _ in tf.range(num_steps)` -- a `tf.while_loop` -- that pulls each batch
  from the `tf.data` iterator inside the graph and runs the step on it, through
  `strategy.run` under a multi-replica strategy. `num_steps` enters as an int64
  tensor, so a new step count does not retrace. This is Orbit's
  `create_tf_while_loop_fn`, and the path `TPUStrategy` needs.
* `compile_step` only (and always when a `reduce_fn` folds outputs into Python
  state): one `tf.function` call per step from a Python loop.
* neither: the step runs eagerly, as plain Python (for debugging).

In the compiled forms looproto pulls one batch per step (one `next()` per
iterator) and hands the step an iterator that yields exactly that batch. That is
what lets the loop count the steps that really ran when the data ends (the loop
stops cleanly and reports them), run the step per replica, and compile the step
with XLA.

A Python iterator (not `tf.data`) whose batches are arrays -- a
`looproto.data.ArrayDataset`'s, say -- runs in the compiled form too: the loop
pulls its `num_steps` batches on the host, stacks them, and one `tf.function`
call runs a `tf.while_loop` over the stacked steps (the JAX backend's `data="stack"`).
A new step count does not retrace; a new batch shape traces once. Other Python
iterators run one `tf.function` call per step (see the `data` option).

NumPy `looproto.Variable`s of the module (the global step from
`looproto.create_global_step()`, a model written against the array API, see
`looproto.portable`) are *lifted* while a loop runs: each is bound to a
`tf.Variable` twin, loaded with its value before the loop; inside the step
`.value` reads the twin and `assign` writes through to it, so the compiled step
updates it on every step; after the loop the values go back into the Variables
as NumPy arrays of their own dtype. This is what the JAX and PyTorch backends do
with such Variables, and it keeps checkpoints of one tree whatever backend wrote them.
(Not under a multi-replica strategy: there, state the step updates must be
`tf.Variable`s created under `strategy.scope()`, with the `aggregation` they need.)

`value_and_grad(fn, module)` differentiates `fn()` with respect to the module's
trainable variables on a `tf.GradientTape`, keyed by variable path, like the JAX
and PyTorch backends' helpers; `array_namespace()` is the Python array API on
TensorFlow tensors (`tf.experimental.numpy` plus the standard names it lacks).

Backend options (`StandardTrainerOptions(backend_options={...})`):

* `strategy`: a `tf.distribute.Strategy`. Default: `tf.distribute.get_strategy()`
  when the loop is built (the strategy whose `scope()` is active, else the
  default strategy).
* `wrap_strategy_run` (default True): under a multi-replica strategy, run the
  step once per replica with `strategy.run` and reduce its outputs. False: call
  the step in cross-replica context, Orbit's convention, where the step calls
  `strategy.run` itself.
* `output_reduction` (default `"mean"`): how per-replica step outputs are
  combined: `"mean"`, `"sum"` (`strategy.reduce`), `"first"` (the first local
  replica's value) or `"concat"` (`strategy.gather` along axis 0).
* `jit_compile` (default None): compile the step with XLA.
* `reduce_retracing` (default False): passed to every `tf.function`.
* `data` (default `"auto"`): how a Python iterator's batches reach the compiled
  loop. `"stack"`: pulled and stacked on the host, all steps in one call;
  `"step"`: one `tf.function` call per step, its batch pulled in Python;
  `"auto"`: `"stack"` for `looproto.data.ArrayDataset` iterators, else `"step"`.
  (`tf.data` iterators are always read inside the graph.)
"""

# The package's files, one concept each (see each file's docstring):
#   _backend.py      `TensorflowBackend`, the `looproto.backends.Backend` of this package
#   _options.py      the `backend_options` and their validation
#   _variables.py    `tf.Variable` and Keras 3 variable discovery
#   _keras.py        Keras 3 objects walked by attribute; optimizers built on restore
#   _lifting.py      NumPy `looproto.Variable`s bound to `tf.Variable` twins while a loop
#                    runs, and the assign hook that writes through to them
#   _side_effects.py Python state a compiled step changes at trace time
#   _batches.py      how the loop pulls batches from (nested) iterators
#   _loop.py         `TensorflowLoop`, the inner loop `make_loop` builds
#   _gradients.py    `value_and_grad` and `grad` over a module's variables
#   _array_api.py    `array_namespace`, the Python array API on TensorFlow tensors
#   _checkpoints.py  `tf.data` iterator positions in checkpoints
#   _tf_checkpoints.py TensorFlow's own checkpoints: `tf.train.CheckpointManager` behind
#                    the Controller's manager protocol, `tf.train.Checkpoint` roots
#   _distributed.py  `MultiWorkerMirroredStrategy`: the engine and `distribute_dataset`
#   _launch.py       `TF_CONFIG`: where a worker sits (framework-free)
# This file imports no TensorFlow: it registers the backend, and each public name below
# imports its file (and TensorFlow) when it is first read.
from __future__ import annotations

from typing import TYPE_CHECKING

from looproto import backends
from looproto.backends._common import lazy_exports
from looproto.backends.tensorflow._launch import LAUNCHER

if TYPE_CHECKING:
    from looproto.backends.tensorflow._array_api import array_namespace as array_namespace
    from looproto.backends.tensorflow._backend import BACKEND as BACKEND
    from looproto.backends.tensorflow._backend import TensorflowBackend as TensorflowBackend
    from looproto.backends.tensorflow._checkpoints import (
        TfDataIteratorState as TfDataIteratorState,
    )
    from looproto.backends.tensorflow._checkpoints import iterator_state as iterator_state
    from looproto.backends.tensorflow._distributed import TensorflowEngine as TensorflowEngine
    from looproto.backends.tensorflow._distributed import (
        distribute_dataset as distribute_dataset,
    )
    from looproto.backends.tensorflow._distributed import (
        initialize_distributed as initialize_distributed,
    )
    from looproto.backends.tensorflow._gradients import grad as grad
    from looproto.backends.tensorflow._gradients import value_and_grad as value_and_grad
    from looproto.backends.tensorflow._loop import TensorflowLoop as TensorflowLoop
    from looproto.backends.tensorflow._side_effects import (
        MSG_TRACE_SIDE_EFFECT as MSG_TRACE_SIDE_EFFECT,
    )
    from looproto.backends.tensorflow._side_effects import (
        TraceSideEffectWarning as TraceSideEffectWarning,
    )
    from looproto.backends.tensorflow._tf_checkpoints import (
        TfCheckpointManager as TfCheckpointManager,
    )

__all__ = [
    "BACKEND",
    "TensorflowBackend",
    "TensorflowEngine",
    "TensorflowLoop",
    "TfCheckpointManager",
    "TfDataIteratorState",
    "TraceSideEffectWarning",
    "array_namespace",
    "distribute_dataset",
    "grad",
    "initialize_distributed",
    "iterator_state",
    "value_and_grad",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BACKEND": "_backend",
        "MSG_TRACE_SIDE_EFFECT": "_side_effects",
        "TensorflowBackend": "_backend",
        "TensorflowEngine": "_distributed",
        "TensorflowLoop": "_loop",
        "TfCheckpointManager": "_tf_checkpoints",
        "TfDataIteratorState": "_checkpoints",
        "TraceSideEffectWarning": "_side_effects",
        "array_namespace": "_array_api",
        "distribute_dataset": "_distributed",
        "grad": "_gradients",
        "initialize_distributed": "_distributed",
        "iterator_state": "_checkpoints",
        "value_and_grad": "_gradients",
    },
)

backends.register(
    "tensorflow",
    "looproto.backends.tensorflow._backend:BACKEND",
    packages=("tensorflow", "tf_keras", "keras"),
    aliases=("tf",),
    install="looproto[tensorflow]",
    launcher=LAUNCHER,
)
