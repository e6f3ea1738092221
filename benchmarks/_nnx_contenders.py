"""Flax NNX contenders for `bench_jax.py`: the workload's MLP as an `nnx.Module` + optax SGD.

* `nnx.jit + nnx.scan`: what an NNX user writes by hand -- one `nnx.jit` call per loop
  whose body is an `nnx.scan` over the stacked batches, the model and its
  `nnx.Optimizer` passed in and updated in place.
* `split/merge + jax.jit(lax.scan)`: NNX's functional API at its fastest -- the state
  split off once and kept as a pytree between calls (never written back into the
  objects), each step merging it into fresh objects inside a jitted, donated scan.
* `looproto train() (NNX)`: a `StandardTrainer` holding the same `nnx.Module` and
  `nnx.Optimizer`, its step plain stateful NNX code, run by the JAX backend's compiled
  loop (one `jit(lax.scan)` per call; the objects are current after every call).

All start from the workload's weights and see the same batches, so their parameters
agree at the end (checked by `bench_jax.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import looproto
from benchmarks import _workloads
from looproto.data import ArrayDataset


class MLP(nnx.Module):
    """The workload's MLP (ReLU between layers), initialised with its weights."""

    def __init__(self, workload: _workloads.Workload) -> None:
        params = workload.params()
        rngs = nnx.Rngs(0)
        layers = []
        for i, (n_in, n_out) in enumerate(zip(workload.sizes[:-1], workload.sizes[1:])):
            layer = nnx.Linear(n_in, n_out, rngs=rngs)
            layer.kernel[...] = jnp.asarray(params[2 * i])
            layer.bias[...] = jnp.asarray(params[2 * i + 1])
            layers.append(layer)
        self.layers = nnx.List(layers)

    def __call__(self, x: Any) -> Any:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def _loss(workload: _workloads.Workload) -> Any:
    def mse(model: MLP, x: Any, y: Any) -> Any:
        return jnp.mean((model(x) - y) ** 2)

    def xent(model: MLP, x: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(model(x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return mse if workload.loss == "mse" else xent


def _objects(workload: _workloads.Workload) -> tuple[MLP, Any]:
    model = MLP(workload)
    return model, nnx.Optimizer(model, optax.sgd(workload.learning_rate), wrt=nnx.Param)


def _stack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


class NnxJitScan:
    """`nnx.jit` of an `nnx.scan` over the loop's batches."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        self.model, self.optimizer = _objects(workload)
        self.iterator = iter(ArrayDataset(data, workload.batch, epochs=None))
        loss = _loss(workload)

        @nnx.jit(donate_argnums=(0, 1))
        def run(model: MLP, optimizer: Any, xs: Any) -> Any:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def body(carry: Any, batch: Any) -> Any:
                model, optimizer = carry
                value, grads = nnx.value_and_grad(loss)(model, batch["x"], batch["y"])
                optimizer.update(model, grads)
                return (model, optimizer), value

            _, losses = body((model, optimizer), xs)
            return losses

        self.run = run

    def __call__(self, steps: int) -> None:
        xs = _stack([next(self.iterator) for _ in range(steps)])
        np.asarray(self.run(self.model, self.optimizer, xs))

    def param_values(self) -> list[np.ndarray[Any, Any]]:
        return _params(self.model)


class SplitMergeScan:
    """The state split once, carried as a pytree through a jitted, donated `lax.scan`."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        model, optimizer = _objects(workload)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.iterator = iter(ArrayDataset(data, workload.batch, epochs=None))
        loss, graphdef = _loss(workload), self.graphdef

        def step(state: Any, batch: Any) -> tuple[Any, Any]:
            model, optimizer = nnx.merge(graphdef, state)
            value, grads = nnx.value_and_grad(loss)(model, batch["x"], batch["y"])
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), value

        self.run = jax.jit(lambda state, xs: lax.scan(step, state, xs), donate_argnums=0)

    def __call__(self, steps: int) -> None:
        xs = _stack([next(self.iterator) for _ in range(steps)])
        self.state, losses = self.run(self.state, xs)
        np.asarray(losses)

    def param_values(self) -> list[np.ndarray[Any, Any]]:
        model, _ = nnx.merge(self.graphdef, self.state)
        return _params(model)


class NnxTrainer(looproto.StandardTrainer):
    """The NNX step written statefully, run by looproto's compiled loop."""

    def __init__(self, workload: _workloads.Workload, data: Any) -> None:
        super().__init__(
            ArrayDataset(data, workload.batch, epochs=None),
            options=looproto.StandardTrainerOptions(backend="jax"),
        )
        self.model, self.optimizer = _objects(workload)
        self.global_step = looproto.create_global_step()
        self.loss = looproto.Variable(jnp.float32(0), trainable=False)
        self._loss_fn = _loss(workload)

    def train_step(self, iterator: Any) -> None:
        batch = next(iterator)
        value, grads = nnx.value_and_grad(self._loss_fn)(self.model, batch["x"], batch["y"])
        self.optimizer.update(self.model, grads)
        self.loss.assign(value)
        self.global_step.assign_add(1)

    def train_loop_end(self) -> Any:
        return {"loss": np.asarray(self.loss.value)}

    def param_values(self) -> list[np.ndarray[Any, Any]]:
        return _params(self.model)


def _params(model: MLP) -> list[np.ndarray[Any, Any]]:
    out = []
    for layer in model.layers:
        out += [np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])]
    return out
