"""Which `looproto.Variable`s of a module the JAX backend lifts into traced code.

The compiled loop and `value_and_grad` both need the module's `looproto.Variable`s as
a flat list (with their paths, for gradients). Flax NNX variables are found by the
same walk but rejected here, with a message saying how to train them instead.
`loop_variables` is the cheaper walk the loop runs on every call.
"""

from __future__ import annotations

from typing import Any

from looproto.backends.jax._nnx import is_nnx_variable
from looproto.errors import ConfigError
from looproto.module import Module, Variable, variables_by_path


def module_variables(module: Any) -> tuple[list[str], list[Variable]]:
    """Paths and `looproto.Variable`s of `module` (other frameworks' are rejected)."""
    paths: list[str] = []
    variables: list[Variable] = []
    for path, variable in variables_by_path(module).items():
        if isinstance(variable, Variable):
            paths.append(path)
            variables.append(variable)
        elif is_nnx_variable(variable):
            # NNX refuses writes from inside a foreign `jax.jit` trace, and a value only
            # read there would be baked into the compiled loop as a constant.
            raise ConfigError(
                f"Module variable {path!r} is a Flax NNX `{type(variable).__name__}`. The JAX "
                "backend discovers, checkpoints and restores NNX variables, but lifts only "
                "`looproto.Variable`s into its compiled loops and `value_and_grad`. Hold the "
                "state in `looproto.Variable`s, or train the NNX module with NNX's own "
                "transforms (`nnx.jit`, `nnx.value_and_grad`) in an eager step "
                "(`StandardTrainerOptions(use_compiled_loop=False, use_compiled_step=False)`)."
            )
    return paths, variables


def _is_any_variable(obj: Any) -> bool:
    return isinstance(obj, Variable) or is_nnx_variable(obj)


def loop_variables(module: Any) -> list[Variable]:
    """`module_variables(module)[1]`, without building paths (run on every loop call)."""
    if not isinstance(module, Module):
        return module_variables(module)[1]
    found = list(module._flatten(predicate=_is_any_variable))
    if not all(isinstance(v, Variable) for v in found):
        return module_variables(module)[1]  # Raises, naming the NNX variable's path.
    return found
