"""looproto: a framework-agnostic training-loop protocol.

`Module` and `Variable` give tf.Module's semantics to any framework; the
`Trainer`/`Evaluator` protocols and the `Controller` give Orbit's outer loop;
backends (`numpy`, `jax`, `tensorflow`, `torch`) supply compiled inner loops.

Importing looproto imports NumPy and the standard library only: frameworks,
orbax and tensorboardX are imported where they are first used.
"""

from looproto import actions as actions
from looproto import backends as backends
from looproto import data as data
from looproto import distributed as distributed
from looproto import metrics as metrics
from looproto import preemption as preemption
from looproto import schedules as schedules
from looproto import summary as summary
from looproto._logging import enable_logging as enable_logging
from looproto.checkpoint import CheckpointManager as CheckpointManager
from looproto.controller import Action as Action
from looproto.controller import Controller as Controller
from looproto.errors import BackendNotAvailableError as BackendNotAvailableError
from looproto.errors import CheckpointError as CheckpointError
from looproto.errors import ConfigError as ConfigError
from looproto.errors import DistributedError as DistributedError
from looproto.errors import LooprotoError as LooprotoError
from looproto.errors import NonFiniteError as NonFiniteError
from looproto.errors import ProtocolError as ProtocolError
from looproto.errors import ShapeError as ShapeError
from looproto.errors import StorageError as StorageError
from looproto.module import Module as Module
from looproto.module import NameScope as NameScope
from looproto.module import Variable as Variable
from looproto.module import create_global_step as create_global_step
from looproto.module import current_name_scope as current_name_scope
from looproto.module import name_scope as name_scope
from looproto.module import variables_by_path as variables_by_path
from looproto.preemption import Preempted as Preempted
from looproto.runner import AbstractEvaluator as AbstractEvaluator
from looproto.runner import AbstractTrainer as AbstractTrainer
from looproto.runner import Evaluator as Evaluator
from looproto.runner import Output as Output
from looproto.runner import Trainer as Trainer
from looproto.standard_runner import StandardEvaluator as StandardEvaluator
from looproto.standard_runner import StandardEvaluatorOptions as StandardEvaluatorOptions
from looproto.standard_runner import StandardTrainer as StandardTrainer
from looproto.standard_runner import StandardTrainerOptions as StandardTrainerOptions
from looproto.summary import SummaryManager as SummaryManager

# The one place the version is written (pyproject.toml reads it from here); a literal,
# since `importlib.metadata` alone costs a quarter of `import looproto`.
__version__ = "0.1.0"

__all__ = [
    "AbstractEvaluator",
    "AbstractTrainer",
    "Action",
    "BackendNotAvailableError",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "Controller",
    "DistributedError",
    "Evaluator",
    "LooprotoError",
    "Module",
    "NameScope",
    "NonFiniteError",
    "Output",
    "Preempted",
    "ProtocolError",
    "ShapeError",
    "StandardEvaluator",
    "StandardEvaluatorOptions",
    "StandardTrainer",
    "StandardTrainerOptions",
    "StorageError",
    "SummaryManager",
    "Trainer",
    "Variable",
    "actions",
    "backends",
    "create_global_step",
    "current_name_scope",
    "data",
    "distributed",
    "enable_logging",
    "metrics",
    "name_scope",
    "preemption",
    "schedules",
    "summary",
    "variables_by_path",
]
