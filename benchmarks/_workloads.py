"""The two benchmark workloads, as NumPy data and initial weights every framework shares.

A: MLP 32->64->64->1, mean squared error, batch 64, SGD.
B: MLP 512->1024->1024->10, softmax cross-entropy, batch 256, SGD.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark problem: layer sizes, loss, batch size and learning rate."""

    name: str
    sizes: tuple[int, ...]
    loss: str  # "mse" or "softmax_xent"
    batch: int
    learning_rate: float = 0.01

    @property
    def title(self) -> str:
        """`"A 32-64-64-1"`."""
        return f"{self.name} {'-'.join(map(str, self.sizes))}"

    def params(self, seed: int = 0) -> list[np.ndarray[Any, Any]]:
        """`[w0, b0, w1, b1, ...]`, scaled normal weights and zero biases."""
        rng = np.random.default_rng(seed)
        out: list[np.ndarray[Any, Any]] = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            out.append(rng.normal(scale=1 / np.sqrt(n_in), size=(n_in, n_out)).astype(np.float32))
            out.append(np.zeros(n_out, np.float32))
        return out

    def batches(self, count: int = 16, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """`count` distinct `(x, y)` batches; `y` is float targets (A) or int32 labels (B)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            x = rng.normal(size=(self.batch, self.sizes[0])).astype(np.float32)
            if self.loss == "mse":
                y = rng.normal(size=(self.batch, self.sizes[-1])).astype(np.float32)
            else:
                y = rng.integers(0, self.sizes[-1], size=self.batch).astype(np.int32)
            out.append((x, y))
        return out


A = Workload("A", (32, 64, 64, 1), "mse", 64)
B = Workload("B", (512, 1024, 1024, 10), "softmax_xent", 256)
WORKLOADS = (A, B)
