"""Portable optimizers' schedules, weight decay and clipping, against optax and by hand.

`looproto.schedules` follow optax's definitions; `portable.Adam` with a schedule,
decoupled weight decay and global-norm clipping trains, inside each backend's compiled
loop, to the parameters optax's `chain(clip_by_global_norm, adamw)` reaches.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import portable, schedules
from looproto.data import ArrayDataset

rng = np.random.default_rng(11)
X = rng.normal(size=(40, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)
W0 = rng.normal(size=(3, 1)).astype(np.float32)
STEPS = 10


def test_schedules_equal_optaxs() -> None:
    optax = pytest.importorskip("optax")
    pairs = [
        (
            schedules.cosine_decay(peak=0.1, decay_steps=12, end=0.01, warmup_steps=4, init=0.02),
            optax.warmup_cosine_decay_schedule(0.02, 0.1, 4, 12, 0.01),
        ),
        (schedules.cosine_decay(peak=0.1, decay_steps=12), optax.cosine_decay_schedule(0.1, 12)),
        (schedules.linear(0.1, 0.0, steps=8), optax.linear_schedule(0.1, 0.0, 8)),
        (
            schedules.piecewise_constant([3, 7], [0.1, 0.05, 0.0125]),
            optax.piecewise_constant_schedule(0.1, {3: 0.5, 7: 0.25}),
        ),
    ]
    for ours, theirs in pairs:
        for step in range(16):
            assert float(ours(step)) == pytest.approx(float(theirs(step)), rel=1e-6), (ours, step)


def _optax_reference(schedule: Any, weight_decay: float, clip: float) -> np.ndarray:
    """The same training, with optax's own AdamW and global-norm clipping, in plain JAX."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-12, weight_decay=weight_decay),
    )
    w = jnp.asarray(W0)
    state = tx.init(w)
    for step in range(STEPS):
        x, y = X[4 * step : 4 * step + 4], Y[4 * step : 4 * step + 4]
        grads = jax.grad(lambda w, x=x, y=y: jnp.mean((x @ w - y) ** 2))(w)
        updates, state = tx.update(grads, state, w)
        w = optax.apply_updates(w, updates)
    return np.asarray(w)


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_portable_adamw_with_a_schedule_and_clipping_trains_as_optax(backend: str) -> None:
    if importlib.util.find_spec(backend) is None or importlib.util.find_spec("optax") is None:
        pytest.skip(f"needs {backend} and optax")
    ours = schedules.cosine_decay(peak=0.05, decay_steps=STEPS, warmup_steps=3, init=0.01)

    class Trainer(looproto.StandardTrainer):
        def __init__(self) -> None:
            options = {"torch": {"backend": "eager"}}.get(backend, {})
            super().__init__(
                ArrayDataset({"x": X, "y": Y}, 4),
                options=looproto.StandardTrainerOptions(backend=backend, backend_options=options),
            )
            self.model = looproto.Module(name="model")
            self.model.w = looproto.Variable(W0.copy())
            self.optimizer = portable.Adam(
                self.model, ours, epsilon=1e-12, weight_decay=0.1, global_clipnorm=0.5
            )
            self.global_step = looproto.create_global_step()

        def train_step(self, iterator: Any) -> None:
            batch = next(iterator)

            def loss() -> Any:
                xp = portable.array_namespace(batch["x"])
                return xp.mean((batch["x"] @ self.model.w.value - batch["y"]) ** 2)

            _, grads = portable.value_and_grad(loss, self.model, backend=backend)
            self.optimizer.apply(grads)
            self.global_step.assign_add(1)

    trainer = Trainer()
    trainer.train(STEPS)
    import optax

    theirs = optax.warmup_cosine_decay_schedule(0.01, 0.05, 3, STEPS)
    reference = _optax_reference(theirs, weight_decay=0.1, clip=0.5)
    np.testing.assert_allclose(trainer.model.w.numpy(), reference, rtol=2e-5, atol=2e-6)
    assert trainer.optimizer.hyperparameters()["learning_rate"] == pytest.approx(
        float(theirs(STEPS)), rel=1e-6
    )


def test_sgd_decays_and_clips_as_computed_by_hand() -> None:
    model = looproto.Module(name="model")
    model.a = looproto.Variable(np.array([1.0, -2.0], np.float32))
    model.b = looproto.Variable(np.array([3.0], np.float32))
    grads = {"a": np.array([0.3, -4.0], np.float32), "b": np.array([2.0], np.float32)}

    by_value = portable.SGD(model, learning_rate=0.1, clipvalue=1.0, weight_decay=0.5)
    by_value.apply(grads)
    a, b = np.array([1.0, -2.0]), np.array([3.0])
    a, b = a - 0.1 * 0.5 * a, b - 0.1 * 0.5 * b  # decoupled decay first
    a, b = a - 0.1 * np.clip([0.3, -4.0], -1, 1), b - 0.1 * np.clip([2.0], -1, 1)
    np.testing.assert_allclose(model.a.numpy(), a, rtol=1e-6)
    np.testing.assert_allclose(model.b.numpy(), b, rtol=1e-6)

    model.a.assign(np.array([1.0, -2.0], np.float32))
    model.b.assign(np.array([3.0], np.float32))
    by_norm = portable.SGD(model, learning_rate=0.1, momentum=0.5, clipnorm=1.0)
    by_norm.apply(grads)
    by_norm.apply(grads)
    ga = np.array([0.3, -4.0]) / np.linalg.norm([0.3, -4.0])  # each scaled to norm 1
    gb = np.array([2.0]) / 2.0
    va, vb = -0.1 * ga, -0.1 * gb
    va, vb = 0.5 * va - 0.1 * ga, 0.5 * vb - 0.1 * gb
    np.testing.assert_allclose(model.a.numpy(), [1.0, -2.0] + (-0.1 * ga) + va, rtol=1e-6)
    np.testing.assert_allclose(model.b.numpy(), [3.0] + (-0.1 * gb) + vb, rtol=1e-6)
    assert by_norm.hyperparameters() == {"learning_rate": 0.1, "momentum": 0.5}


def test_bad_optimizer_options_are_named() -> None:
    model = looproto.Module(name="model")
    model.w = looproto.Variable(np.ones(2, np.float32))
    with pytest.raises(looproto.ConfigError, match=r"at most one of .*\['clipvalue', 'clipnorm'\]"):
        portable.SGD(model, clipvalue=1.0, clipnorm=1.0)
    with pytest.raises(looproto.ConfigError, match=r"`weight_decay` must be a positive number"):
        portable.Adam(model, weight_decay=-0.1)
    with pytest.raises(looproto.ConfigError, match=r"`decay_steps` \(3\) must be larger than"):
        schedules.cosine_decay(peak=0.1, decay_steps=3, warmup_steps=3)
    with pytest.raises(looproto.ConfigError, match=r"one more entry than `boundaries`"):
        schedules.piecewise_constant([3], [0.1])
