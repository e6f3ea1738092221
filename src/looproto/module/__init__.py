"""`Module` and `Variable`: tf.Module's semantics in pure Python, for any framework.

* `_scope.py` -- name scopes (`NameScope`, `name_scope`, `current_name_scope`);
* `_variable.py` -- `Variable` (and `TreeVariable`, one holding a pytree), and what
  the core asks about any framework's variables (`is_variable`, `variable_to_numpy`,
  `assign_variable`, ...);
* `_module.py` -- `Module` and the walk that discovers variables and submodules;
* `_tree.py` -- walking, rebuilding and checking the pytrees a `TreeVariable` holds.

Framework objects are recognised through the backend registry
(`looproto.backends`); nothing here imports a framework.
"""

from looproto.module._module import Module as Module
from looproto.module._module import camel_to_snake as camel_to_snake
from looproto.module._module import variables_by_path as variables_by_path
from looproto.module._scope import NameScope as NameScope
from looproto.module._scope import current_name_scope as current_name_scope
from looproto.module._scope import name_scope as name_scope
from looproto.module._tree import TreeLeaf as TreeLeaf
from looproto.module._variable import TreeVariable as TreeVariable
from looproto.module._variable import Variable as Variable
from looproto.module._variable import assign_variable as assign_variable
from looproto.module._variable import backend_for_variable as backend_for_variable
from looproto.module._variable import create_global_step as create_global_step
from looproto.module._variable import is_trainable as is_trainable
from looproto.module._variable import is_variable as is_variable
from looproto.module._variable import read_int as read_int
from looproto.module._variable import variable_to_numpy as variable_to_numpy

__all__ = [
    "Module",
    "NameScope",
    "TreeLeaf",
    "TreeVariable",
    "Variable",
    "assign_variable",
    "backend_for_variable",
    "camel_to_snake",
    "create_global_step",
    "current_name_scope",
    "is_trainable",
    "is_variable",
    "name_scope",
    "read_int",
    "variable_to_numpy",
    "variables_by_path",
]
