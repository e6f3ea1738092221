"""A stand-in for `tensorflow_datasets` that works offline: `load("iris")` only.

Orbit's `single_task` tests call `tfds.load('iris')`; this gives what TFDS gives, a
dict of splits (`"train"`, 150 examples) of `{"features": float32 [4], "label": int64}`,
built from the copy of the Iris data that scikit-learn ships. It is put on `sys.path`
only in the process that runs Orbit's test files (see `tests/orbit/suite_conftest.py`).
"""

from __future__ import annotations

from typing import Any


def load(name: str, split: str | None = None, **kwargs: Any) -> Any:
    """`tfds.load(name)` for `name="iris"`: `{"train": tf.data.Dataset}` (or one split)."""
    if name != "iris":
        raise ValueError(
            f"this offline stand-in for tensorflow_datasets has only 'iris', not {name!r}"
        )
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_iris

    iris = load_iris()
    train = tf.data.Dataset.from_tensor_slices(
        {"features": iris.data.astype(np.float32), "label": iris.target.astype(np.int64)}
    )
    splits = {"train": train}
    return splits if split is None else splits[split]
