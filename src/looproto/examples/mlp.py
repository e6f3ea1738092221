"""Config factories for the MLP regression example, on whichever backend the config names.

`looproto/examples/configs/mlp_<backend>.toml` differ only in their `backend` line:

    looproto train src/looproto/examples/configs/mlp_numpy.toml
    looproto train src/looproto/examples/configs/mlp_tensorflow.toml
    looproto train src/looproto/examples/configs/mlp_jax.toml

Each backend has its own implementation of the same model (`numpy_mlp`,
`tensorflow_mlp`, ...): the same tree of variables, the same initial weights, the same
data. These factories pick the implementation; the Controller, summaries and
checkpoints around it are the same for all.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from looproto.errors import ConfigError

__all__ = ["IMPLEMENTATIONS", "evaluator", "trainer"]

IMPLEMENTATIONS = {
    "jax": "looproto.examples.jax_mlp",
    "numpy": "looproto.examples.numpy_mlp",
    "tensorflow": "looproto.examples.tensorflow_mlp",
    "torch": "looproto.examples.torch_mlp",
}


def _implementation(backend: str) -> Any:
    try:
        name = IMPLEMENTATIONS[backend]
    except KeyError:
        raise ConfigError(
            f"The MLP example has no implementation for backend {backend!r}; expected one "
            f"of {sorted(IMPLEMENTATIONS)}."
        ) from None
    return importlib.import_module(name)


def trainer(
    backend: str,
    backend_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
) -> Any:
    """The MLP trainer of `backend` (SGD with momentum, shuffled training data).

    `backend_options` is the config's `[backend_options.<backend>]` table.
    """
    return _implementation(backend).make_trainer(
        seed=seed,
        batch_size=batch_size,
        learning_rate=learning_rate,
        momentum=momentum,
        backend_options=backend_options,
    )


def evaluator(backend: str, trainer: Any, seed: int = 0) -> Any:
    """An evaluator of `trainer`'s model on held-out data."""
    return _implementation(backend).make_evaluator(trainer, seed=seed)
