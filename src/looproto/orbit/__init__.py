"""`looproto.orbit`: Orbit's API, on looproto's machinery, for Orbit code as it is.

Orbit (the `orbit` package of TensorFlow Models) ports by changing its imports:
`import orbit` becomes `from looproto import orbit`, and `from orbit.x import y`
becomes `from looproto.orbit.x import y`. The namespace mirrors Orbit's module tree
(`controller`, `runner`, `standard_runner`, `actions`, `utils`), its names, argument
orders and behaviours: `num_steps` as a tensor, any value passed through from
`train_loop_end`/`eval_end`, `summary_fn` and in-step `tf.summary` under
`summary_interval`, `enable_async_checkpointing`, `tf.train.CheckpointManager`,
checkpoints saved only when the manager has a `checkpoint_interval`, ...

Underneath it is looproto: the `Controller` is `looproto.Controller` (SIGTERM saves and
stops, a restored global step is checked against the checkpoint), the runners are
`looproto.StandardTrainer`/`StandardEvaluator` with their loops compiled by a
looproto backend (TensorFlow by default for Orbit code; another where
`StandardTrainerOptions(backend=...)` says so and the steps allow it). Orbit code is
TensorFlow code: importing this package imports TensorFlow, and `import looproto` never
imports it. What differs from Orbit, and how to move on to core `looproto` (and other
frameworks), is in `docs/porting-from-orbit.md`.
"""

from looproto.orbit import actions as actions
from looproto.orbit import utils as utils
from looproto.orbit.controller import Action as Action
from looproto.orbit.controller import Controller as Controller
from looproto.orbit.runner import AbstractEvaluator as AbstractEvaluator
from looproto.orbit.runner import AbstractTrainer as AbstractTrainer
from looproto.orbit.standard_runner import StandardEvaluator as StandardEvaluator
from looproto.orbit.standard_runner import StandardEvaluatorOptions as StandardEvaluatorOptions
from looproto.orbit.standard_runner import StandardTrainer as StandardTrainer
from looproto.orbit.standard_runner import StandardTrainerOptions as StandardTrainerOptions

__all__ = [
    "AbstractEvaluator",
    "AbstractTrainer",
    "Action",
    "Controller",
    "StandardEvaluator",
    "StandardEvaluatorOptions",
    "StandardTrainer",
    "StandardTrainerOptions",
    "actions",
    "utils",
]
