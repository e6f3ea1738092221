"""The PyTorch backend: discovery, the compiled loop, host syncs, checkpoints, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.utils import counters  # noqa: E402

import looproto  # noqa: E402
from looproto import backends, testing  # noqa: E402
from looproto.backends import LoopOptions  # noqa: E402
from looproto.backends import torch as torch_backend  # noqa: E402
from looproto.backends.torch import _device as torch_device  # noqa: E402
from looproto.backends.torch import _loop as torch_loop  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from looproto.errors import (  # noqa: E402
    BackendNotAvailableError,
    CheckpointError,
    ConfigError,
    ProtocolError,
)
from looproto.module import is_trainable, variable_to_numpy, variables_by_path  # noqa: E402

BACKEND = backends.get("torch")
LR = 0.05


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # Dynamo caches compiled frames per optimizer object; many trainers in one process
    # would reach its recompile limit and silently run eagerly.
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5]], np.float32))
    return {"x": x, "y": y.astype(np.float32)}


class Net(torch.nn.Module):
    """A user subclass (defined outside torch) with parameters and buffers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(3, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.l2 = torch.nn.Linear(8, 1)
        self.register_buffer("cache", torch.zeros(2), persistent=False)

    def forward(self, x: Any) -> Any:
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def make_optimizer(model: torch.nn.Module, kind: str) -> Any:
    if kind == "adam":
        return torch.optim.Adam(model.named_parameters(), lr=0.01)
    return torch.optim.SGD(model.named_parameters(), lr=LR, momentum=0.9)


class Trainer(looproto.StandardTrainer):
    def __init__(
        self,
        dataset: Any,
        options: Any = None,
        optimizer: str = "sgd",
        scheduler: bool = False,
    ) -> None:
        super().__init__(dataset, options=options)
        self.model = Net()
        self.optimizer = make_optimizer(self.model, optimizer)
        if scheduler:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 4, gamma=0.5)
        self.global_step = looproto.create_global_step()
        self.loss_sum = looproto.Variable(np.float32(0), trainable=False, name="loss_sum")

    def train_loop_begin(self) -> None:
        self.loss_sum.assign(0.0)

    def train_step(self, iterator: Any) -> Any:
        batch = next(iterator)
        loss = torch.mean((self.model(batch["x"]) - batch["y"]) ** 2)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if hasattr(self, "scheduler"):
            self.scheduler.step()
        self.loss_sum.assign_add(loss.detach())
        self.global_step.assign_add(1)
        return {"loss": loss}

    def train_loop_end(self) -> Any:
        return {"loss_sum": self.loss_sum.numpy()}


def options(compiled: bool = True, **backend_options: Any) -> looproto.StandardTrainerOptions:
    return looproto.StandardTrainerOptions(
        use_compiled_step=compiled,
        use_compiled_loop=compiled,
        backend_options=backend_options,
    )


EAGER = options(False)
AOT = options(backend="aot_eager")


def hand_written(data: dict[str, np.ndarray], steps: int, batch: int = 8) -> list[Any]:
    """The same model, seed, batches and updates as `Trainer`, as a plain eager loop."""
    model = Net()
    optimizer = make_optimizer(model, "sgd")
    for i in range(steps):
        start = (i * batch) % len(data["x"])
        x = torch.from_numpy(data["x"][start : start + batch])
        y = torch.from_numpy(data["y"][start : start + batch])
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def model_state(trainer: Trainer) -> list[Any]:
    return [p.detach().clone() for p in trainer.model.parameters()] + [
        b.clone() for b in trainer.model.buffers()
    ]


def all_values(root: Any) -> dict[str, np.ndarray]:
    return {path: variable_to_numpy(v) for path, v in variables_by_path(root).items()}


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Counts every way a tensor's data can reach Python (each is a sync on a device)."""
    names = ["item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str, method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, counting(name, saved[name]))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# -- contract and discovery -------------------------------------------------------


def test_check_backend() -> None:
    testing.check_backend(
        BACKEND, make_variable=lambda a: torch.nn.Parameter(torch.from_numpy(a.copy()))
    )
    assert isinstance(BACKEND, backends.Backend)


def test_discovers_parameters_buffers_and_optimizer_state_by_path() -> None:
    trainer = Trainer(ArrayDataset(make_data(), 8, epochs=None), options=EAGER, scheduler=True)
    trainer.model.l2.bias.requires_grad_(False)
    paths = variables_by_path(trainer)
    model_paths = [p for p in paths if p.startswith("model/")]
    assert model_paths == [
        "model/l1/weight",
        "model/l1/bias",
        "model/bn/weight",
        "model/bn/bias",
        "model/l2/weight",
        "model/l2/bias",
        "model/bn/running_mean",
        "model/bn/running_var",
        "model/bn/num_batches_tracked",
    ]  # The non-persistent `cache` buffer is not state (as in `state_dict()`).
    trainable = variables_by_path(trainer, predicate=is_trainable)
    assert sorted(trainable) == sorted(
        ["model/l1/weight", "model/l1/bias", "model/bn/weight", "model/bn/bias", "model/l2/weight"]
    )
    # A fresh optimizer already lists the state its first step will create.
    assert "optimizer/state/l1/weight/momentum_buffer" in paths
    assert "optimizer/state/l1/weight/has_state" in paths
    assert "optimizer/state/l2/bias/momentum_buffer" not in paths  # frozen: never gets state
    assert {"optimizer/param_groups/0/lr", "scheduler/last_epoch"} <= set(paths)
    assert not trainer.optimizer.state  # ...without creating it.
    trainer.train(2)
    after = variables_by_path(trainer)
    assert list(after) == list(paths)
    np.testing.assert_array_equal(
        variable_to_numpy(after["optimizer/state/l1/weight/momentum_buffer"]),
        trainer.optimizer.state[trainer.model.l1.weight]["momentum_buffer"].numpy(),
    )

    holder = looproto.Module(name="holder")
    holder.opt = torch.optim.Adam(Net().parameters())  # No names: positions instead.
    assert "opt/state/0/exp_avg" in variables_by_path(holder)


def test_wrapped_modules_keep_their_paths() -> None:
    import torch.distributed as dist

    def paths(model: Any) -> list[str]:
        holder = looproto.Module(name="holder")
        holder.model = model
        return list(variables_by_path(holder))

    plain = Net()
    expected = paths(plain)
    assert paths(torch.compile(plain)) == expected
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert paths(torch.nn.parallel.DistributedDataParallel(plain)) == expected
    finally:
        dist.destroy_process_group()


def test_parameters_and_tensor_variables_held_directly() -> None:
    module = looproto.Module(name="direct")
    module.w = torch.nn.Parameter(torch.ones(2, 3))
    module.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    module.count = looproto.Variable(torch.zeros((), dtype=torch.int64), trainable=False)
    module.plain = torch.ones(4)  # Not state: a plain tensor, as on an nn.Module.
    assert list(variables_by_path(module)) == ["count", "frozen", "w"]
    assert [v is module.w for v in module.trainable_variables] == [True]
    module.count.assign_add(2)
    module.count.assign(5)  # A Python number into a tensor Variable, in place.
    assert module.count.dtype == np.int64
    assert int(module.count.numpy()) == 5
    assert isinstance(module.count.value, torch.Tensor)
    looproto.module.assign_variable(module.w, np.full((2, 3), 2.0))
    assert float(module.w.detach().sum()) == 12.0
    assert module.w.dtype == torch.float32


# -- the loop: same numbers as a hand-written loop -------------------------------------


def test_eager_loop_matches_hand_written_loop_bit_for_bit() -> None:
    data = make_data()
    trainer = Trainer(ArrayDataset(data, 8, epochs=None), options=EAGER)
    out = trainer.train(7)
    trainer.train(6)
    for ours, theirs in zip(model_state(trainer), hand_written(data, 13)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert int(trainer.global_step) == 13
    assert isinstance(trainer.global_step.value, (np.ndarray, np.generic))
    assert trainer.global_step.dtype == np.int64
    assert set(out) == {"loss_sum"}
    assert isinstance(out["loss_sum"], np.ndarray)


def test_compiled_loop_matches_eager_loop() -> None:
    data = make_data()
    eager = Trainer(ArrayDataset(data, 8, epochs=None), options=EAGER)
    compiled = Trainer(ArrayDataset(data, 8, epochs=None), options=AOT)
    for trainer in (eager, compiled):
        trainer.train(5)
        trainer.train(5)
    for a, b in zip(model_state(compiled), model_state(eager)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(compiled.loss_sum.numpy(), eager.loss_sum.numpy(), rtol=1e-6)
    assert int(compiled.global_step) == 10


def test_inductor_loop_matches_hand_written_loop() -> None:
    data = make_data()
    trainer = Trainer(ArrayDataset(data, 8, epochs=None))  # Default: inductor.
    trainer.train(6)
    trainer.train(6)
    for ours, theirs in zip(model_state(trainer), hand_written(data, 12)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("nan_check", [False, True], ids=["plain", "nan_check"])
def test_one_host_sync_per_loop_whatever_its_length(compiled: bool, nan_check: bool) -> None:
    opts = options(compiled, nan_check=nan_check, **({"backend": "aot_eager"} if compiled else {}))
    trainer = Trainer(ArrayDataset(make_data(), 8, epochs=None), options=opts)
    trainer.train(2)  # Compiles.
    for steps in (1, 4, 16):
        with host_reads() as reads:
            trainer.train(steps)
        assert reads == ["numpy"], (steps, reads)  # The lifted variables (+ NaN record).

    class Reading(Trainer):
        def train_step(self, iterator: Any) -> Any:
            out = super().train_step(iterator)
            out["loss"].item()  # A per-step sync: the counter must see it.
            return out

    reading = Reading(ArrayDataset(make_data(), 8, epochs=None), options=EAGER)
    with host_reads() as reads:
        reading.train(3)
    assert reads.count("item") == 3


def test_to_host_is_one_transfer_for_mixed_dtypes() -> None:
    tree = {
        "a": torch.tensor(1.5),
        "b": [torch.arange(3), torch.tensor([True, False])],
        "c": {"d": torch.ones(2, 2, dtype=torch.float64), "e": torch.tensor(0.25).bfloat16()},
        "n": 3,
        "v": looproto.Variable(np.float32(2.0)),
    }
    with host_reads() as reads:
        host = BACKEND.to_host(tree)
    assert reads == ["numpy"]
    assert host["a"] == np.float32(1.5) and host["a"].dtype == np.float32
    assert host["b"][0].tolist() == [0, 1, 2] and host["b"][0].dtype == np.int64
    assert host["b"][1].tolist() == [True, False]
    np.testing.assert_array_equal(host["c"]["d"], np.ones((2, 2)))
    assert float(host["c"]["e"]) == 0.25
    assert host["n"] == 3 and float(host["v"]) == 2.0


def test_numpy_variables_are_tensors_inside_the_loop_and_numpy_outside() -> None:
    seen: list[Any] = []

    class Recording(Trainer):
        def train_step(self, iterator: Any) -> Any:
            seen.append((type(self.global_step.value), type(self.precise.value)))
            self.precise.assign_add(0.5)
            return super().train_step(iterator)

    trainer = Recording(ArrayDataset(make_data(), 8, epochs=None), options=EAGER)
    trainer.precise = looproto.Variable(np.float64(0), trainable=False)
    trainer.train(4)
    assert seen == [(torch.Tensor, torch.Tensor)] * 4
    assert trainer.precise.dtype == np.float64 and float(trainer.precise) == 2.0
    assert isinstance(trainer.global_step.value, (np.ndarray, np.generic))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_in_place_updates_of_lifted_variables_are_kept(compiled: bool) -> None:
    class InPlace(looproto.StandardTrainer):
        def __init__(self) -> None:
            # Compiled as one graph: both kinds of update trace without a break.
            extra = {"backend": "aot_eager", "fullgraph": True} if compiled else {}
            opts = options(compiled, **extra)
            super().__init__(range(100), options=dataclasses.replace(opts, backend="torch"))
            self.total = looproto.Variable(np.float32(0), trainable=False)
            self.last = looproto.Variable(np.int64(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            value = next(iterator)
            self.total.value.add_(value)  # In place on the lifted tensor.
            self.last.assign(7)  # A Python number: written in place too.

    trainer = InPlace()
    trainer.train(4)
    trainer.train(2)
    assert float(trainer.total) == sum(range(6)) and int(trainer.last) == 7
    assert trainer.train(1) is None and isinstance(trainer.total.value, np.ndarray)


def test_numpy_global_step_compiles_to_one_graph_without_recompiles() -> None:
    class Counter(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(None, options=options(backend="eager", fullgraph=True))
            self.global_step = looproto.create_global_step()
            self.w = torch.nn.Parameter(torch.ones(3))

        def train_step(self, iterator: Any) -> Any:
            with torch.no_grad():
                self.w.mul_(0.5)
            self.global_step.assign_add(1)

    trainer = Counter()
    for _ in range(4):
        trainer.train(5)
    assert int(trainer.global_step) == 20
    assert counters["stats"]["unique_graphs"] == 1


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_nan_check_names_the_step_and_the_output(compiled: bool) -> None:
    data = make_data(48)
    data["y"][26] = np.nan  # In the 4th batch of 8.
    opts = options(compiled, nan_check=True, **({"backend": "aot_eager"} if compiled else {}))
    trainer = Trainer(ArrayDataset(data, 8, epochs=None), options=opts)
    trainer.train(2)
    with pytest.raises(torch_backend.NonFiniteError) as info:
        trainer.train(5)
    message = str(info.value)
    assert "Trainer.train_step" in message and "['loss']" in message
    assert "step 2 of this 5-step loop (the loop started at global step 2)" in message
    assert isinstance(info.value, looproto.LooprotoError)
    assert int(trainer.global_step) == 7  # The loop ran to its end, written back.


def test_nan_check_needs_float_outputs() -> None:
    class Silent(Trainer):
        def train_step(self, iterator: Any) -> None:
            super().train_step(iterator)

    trainer = Silent(
        ArrayDataset(make_data(), 8, epochs=None), options=options(False, nan_check=True)
    )
    with pytest.raises(ProtocolError, match=r"nan_check.*Silent\.train_step.*None"):
        trainer.train(2)


def test_graph_break_under_fullgraph_is_a_short_protocol_error() -> None:
    trainer = Trainer(
        ArrayDataset(make_data(), 8, epochs=None), options=options(backend="eager", fullgraph=True)
    )
    with pytest.raises(ProtocolError) as info:
        trainer.train(2)
    message = str(info.value)
    assert message.startswith("`Trainer.train_step` cannot be compiled as one graph")
    assert "backward()" in message and "test_torch.py" in message  # The reason and where.
    assert "fullgraph=False" in message
    assert len(message.splitlines()) == 1
    assert info.value.__suppress_context__  # Not a 100-line Dynamo traceback.


def test_step_recompiling_every_call_is_a_protocol_error() -> None:
    class Counting(looproto.StandardTrainer):
        def __init__(self) -> None:
            super().__init__(None, options=options(backend="eager", fullgraph=True))
            self.w = torch.nn.Parameter(torch.ones(3))
            self.calls = 0

        def train_step(self, iterator: Any) -> None:
            self.calls += 1
            self.label = f"call {self.calls}"  # A new Python string: a guard fails every call.
            with torch.no_grad():
                self.w.mul_(2.0 if self.label.endswith("7") else 1.0)

    with pytest.raises(ProtocolError, match=r"Counting\.train_step.*recompile limit"):
        Counting().train(20)


def test_mixed_devices_and_wrong_device_are_config_errors() -> None:
    trainer = Trainer(ArrayDataset(make_data(), 8, epochs=None), options=EAGER)
    trainer.model.l2.to("meta")
    with pytest.raises(ConfigError, match=r"several devices.*'cpu'.*'meta' \(e\.g\. 'model/l2"):
        trainer.train(1)
    trainer = Trainer(
        ArrayDataset(make_data(), 8, epochs=None), options=options(False, device="meta")
    )
    with pytest.raises(ConfigError, match=r"device.*'meta'.*'cpu'"):
        trainer.train(1)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ({"nope": 1}, ConfigError, r"Unknown torch `backend_options` \['nope'\].*'fullgraph'"),
        ({"mode": "fast"}, ConfigError, "mode"),
        ({"fullgraph": 1}, ConfigError, "fullgraph"),
        ({"dynamic": "yes"}, ConfigError, "dynamic"),
        ({"backend": "no_such_compiler"}, ConfigError, "inductor"),
        ({"device": "warp-drive"}, ConfigError, "warp-drive"),
        ({"device": "xla"}, BackendNotAvailableError, "torch_xla"),
    ],
)
def test_backend_options_are_checked(bad: dict[str, Any], error: type, match: str) -> None:
    trainer = Trainer([], options=EAGER)
    with pytest.raises(error, match=match):
        BACKEND.make_loop(
            trainer.train_step, module=trainer, options=LoopOptions(backend_options=bad)
        )


def test_cuda_device_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        BACKEND.make_loop(
            lambda it: None,
            module=looproto.Module(),
            options=LoopOptions(backend_options={"device": "cuda"}),
        )


def test_iterator_misuse_is_a_protocol_error() -> None:
    class Greedy(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)
            next(iterator)

    with pytest.raises(ProtocolError, match="twice"):
        Greedy(ArrayDataset(make_data(), 8, epochs=None), options=EAGER).train(2)

    class NoData(Trainer):
        def train_step(self, iterator: Any) -> None:
            next(iterator)

    with pytest.raises(ProtocolError, match="no data iterator"):
        NoData(None, options=EAGER).train(1)


# -- data ----------------------------------------------------------------------------


def test_dataloader_nested_iterators_and_a_short_last_batch() -> None:
    x = torch.arange(20, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=6)

    class Sum(looproto.StandardTrainer):
        def __init__(self, dataset: Any) -> None:
            # Only NumPy Variables: the torch backend must be asked for by name.
            opts = looproto.StandardTrainerOptions(
                backend="torch", backend_options={"backend": "aot_eager"}
            )
            super().__init__(dataset, options=opts)
            self.total = looproto.Variable(np.float32(0), trainable=False)
            self.seen = looproto.Variable(np.int64(0), trainable=False)

        def train_step(self, iterator: Any) -> None:
            if isinstance(iterator, dict):
                (a,) = next(iterator["a"])
                b = next(iterator["b"])["x"]
                self.total.assign_add(a.sum() + b.sum())
                self.seen.assign_add(a.shape[0] + b.shape[0])
            else:
                (batch,) = next(iterator)
                self.total.assign_add(batch.sum())
                self.seen.assign_add(batch.shape[0])

    trainer = Sum(loader)  # Batches of 6, 6, 6 and 2.
    assert trainer.train(10) is None
    assert int(trainer.seen) == 20 and float(trainer.total) == float(x.sum())
    nested = Sum({"a": loader, "b": ArrayDataset({"x": np.ones(8, np.float32)}, 2)})
    nested.train(3)
    assert int(nested.seen) == 18 + 6
    assert float(nested.total) == float(x[:18].sum()) + 6


def test_evaluator_reduces_on_device_and_syncs_once() -> None:
    data = make_data(40)
    model = Net()
    model.eval()

    class Eval(looproto.StandardEvaluator):
        def __init__(self) -> None:
            super().__init__(ArrayDataset(data, 8), options=looproto.StandardEvaluatorOptions())
            self.model = model

        def eval_begin(self) -> Any:
            return {"sse": torch.zeros(()), "n": torch.zeros((), dtype=torch.int64)}

        def eval_step(self, iterator: Any) -> Any:
            batch = next(iterator)
            with torch.no_grad():
                err = self.model(batch["x"]) - batch["y"]
            return {"sse": (err**2).sum(), "n": torch.tensor(err.shape[0])}

        def eval_reduce(self, state: Any = None, step_outputs: Any = None) -> Any:
            return {key: state[key] + step_outputs[key] for key in state}

        def eval_end(self, *args: Any) -> Any:
            state = BACKEND.to_host(args[0])
            return {"mse": state["sse"] / state["n"]}

    evaluator = Eval()
    evaluator.evaluate(-1)
    with host_reads() as reads:
        out = evaluator.evaluate(-1)
    assert reads == ["numpy"]
    with torch.no_grad():
        expected = torch.mean(
            (model(torch.from_numpy(data["x"])) - torch.from_numpy(data["y"])) ** 2
        )
    assert float(out["mse"]) == pytest.approx(float(expected), rel=1e-6)


# -- gradients -------------------------------------------------------------------------


def test_value_and_grad_by_path() -> None:
    model = Net()
    holder = looproto.Module(name="holder")
    holder.model = model
    holder.scale = looproto.Variable(torch.tensor(2.0))  # A trainable tensor Variable.
    holder.unused = torch.nn.Parameter(torch.ones(2))
    data = make_data(8)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])

    def loss_fn() -> Any:
        return torch.mean((model(x) * holder.scale.value - y) ** 2)

    loss, grads = torch_backend.value_and_grad(loss_fn, holder)
    assert sorted(grads) == sorted(variables_by_path(holder, predicate=is_trainable))
    reference = torch.autograd.grad(loss_fn(), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), reference):
        torch.testing.assert_close(grads[f"model/{name.replace('.', '/')}"], g)
    assert float(grads["scale"]) != 0.0 and not holder.scale.value.requires_grad
    torch.testing.assert_close(grads["unused"], torch.zeros(2))
    assert all(p.grad is None for p in model.parameters())  # Functional: no `.grad`.
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(loss_fn().detach()))

    (value, aux), _ = BACKEND.value_and_grad(lambda: (loss_fn(), {"n": x.sum()}), holder, True)
    assert float(value) == float(loss)
    assert float(aux["n"]) == float(x.sum()) and not aux["n"].requires_grad
    grads2, aux2 = torch_backend.grad(lambda: (loss_fn(), 7), holder, has_aux=True)
    assert aux2 == 7
    torch.testing.assert_close(grads2["model/l1/weight"], grads["model/l1/weight"])
    with pytest.raises(ProtocolError, match="has_aux"):
        torch_backend.value_and_grad(loss_fn, holder, has_aux=True)

    numpy_holder = looproto.Module(name="numpy_holder")
    numpy_holder.w = looproto.Variable(np.ones(2, np.float32))
    with pytest.raises(ProtocolError, match=r"'w' holds ndarray"):
        torch_backend.value_and_grad(lambda: torch.zeros(()), numpy_holder)


class Functional(looproto.StandardTrainer):
    """A step written with `value_and_grad` and tensor ops only: one graph under fullgraph."""

    def __init__(self, dataset: Any, opts: Any) -> None:
        super().__init__(dataset, options=opts)
        self.net = Scaled()
        self.global_step = looproto.create_global_step()

    def train_step(self, iterator: Any) -> Any:
        batch = next(iterator)
        loss, grads = torch_backend.value_and_grad(
            lambda: torch.mean((self.net(batch["x"]) - batch["y"]) ** 2), self.net
        )
        with torch.no_grad():
            for path, variable in variables_by_path(self.net, predicate=is_trainable).items():
                variable.sub_(LR * grads[path])
        self.global_step.assign_add(1)
        return {"loss": loss}


class Scaled(looproto.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    @looproto.Module.with_name_scope
    def __call__(self, x: Any) -> Any:
        return self.model(x)


def test_functional_step_is_one_graph_under_fullgraph() -> None:
    if importlib.util.find_spec("jax") is not None:
        backends.get("jax")  # Its name-scope hook too (orbax imports JAX in real runs).
    data = make_data()
    compiled = Functional(
        ArrayDataset(data, 8, epochs=None),
        options(backend="eager", fullgraph=True, trace_autograd=True, nan_check=True),
    )
    eager = Functional(ArrayDataset(data, 8, epochs=None), EAGER)
    for trainer in (compiled, eager):
        trainer.train(4)
        trainer.train(4)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(compiled.net.model.parameters(), eager.net.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert int(compiled.global_step) == 8


def test_name_scopes_reach_the_profiler() -> None:
    trainer = Functional(ArrayDataset(make_data(), 8, epochs=None), EAGER)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train(2)
    names = {event.name for event in prof.events()}
    assert "scaled" in names  # The module's scope, from `Module.with_name_scope`.
    assert type(BACKEND.name_scope("a/")).__name__ == "nullcontext"  # No profiler: free.


# -- checkpoints -------------------------------------------------------------------------


def make_checkpointed(optimizer: str = "adam") -> Trainer:
    dataset = ArrayDataset(make_data(), 8, shuffle=True, seed=3, epochs=None)
    return Trainer(dataset, options=EAGER, optimizer=optimizer, scheduler=True)


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Any) -> None:
    straight = make_checkpointed()
    straight.train(6)
    straight.train(6)

    first = make_checkpointed()
    first.train(6)
    with looproto.CheckpointManager(str(tmp_path), first) as manager:
        manager.save(checkpoint_number=6)
    resumed = make_checkpointed()
    assert not resumed.optimizer.state  # Fresh: no state until restored.
    with looproto.CheckpointManager(str(tmp_path), resumed) as manager:
        manager.restore(6)
    assert len(resumed.optimizer.state) == 6
    assert resumed.scheduler.last_epoch == 6 and int(resumed.global_step) == 6
    resumed.train(6)
    expected, got = all_values(straight), all_values(resumed)
    assert list(got) == list(expected)
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


def test_checkpoint_of_an_unstepped_optimizer_restores_to_no_state(tmp_path: Any) -> None:
    with looproto.CheckpointManager(str(tmp_path), make_checkpointed()) as manager:
        manager.save(checkpoint_number=0)
    restored = make_checkpointed()
    restored.train(3)  # Has state now; the checkpoint says it had none.
    with looproto.CheckpointManager(str(tmp_path), restored) as manager:
        manager.restore(0)
    assert not restored.optimizer.state
    fresh = make_checkpointed()
    restored.train(5)
    fresh.train(5)
    for a, b in zip(model_state(restored), model_state(fresh)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # Adam's step count starts at 0.


def test_checkpoint_that_does_not_match_lists_paths_and_restores_nothing(tmp_path: Any) -> None:
    source = make_checkpointed("adam")
    source.train(2)
    with looproto.CheckpointManager(str(tmp_path), source) as manager:
        manager.save(checkpoint_number=2)
    target = make_checkpointed("sgd")
    before = all_values(target)
    with pytest.raises(CheckpointError, match=r"optimizer/state/l1/weight/exp_avg") as info:
        looproto.CheckpointManager(str(tmp_path), target).restore(2)
    assert "momentum_buffer" in str(info.value)
    for path, value in all_values(target).items():
        np.testing.assert_array_equal(value, before[path])


def test_torch_generators_are_checkpointed(tmp_path: Any) -> None:
    holder = looproto.Module(name="holder")
    holder.rng = torch.Generator().manual_seed(5)
    torch.rand(3, generator=holder.rng)
    with looproto.CheckpointManager(str(tmp_path), holder) as manager:
        manager.save(checkpoint_number=1)
    expected = torch.rand(4, generator=holder.rng)
    other = looproto.Module(name="holder")
    other.rng = torch.Generator().manual_seed(123)
    looproto.CheckpointManager(str(tmp_path), other).restore(1)
    assert list(variables_by_path(other)) == ["rng"]
    torch.testing.assert_close(torch.rand(4, generator=other.rng), expected, rtol=0, atol=0)


def test_checkpoints_cross_numpy_and_torch(tmp_path: Any) -> None:
    class NumpyModel(looproto.Module):
        def __init__(self) -> None:
            super().__init__(name="model")
            self.w = looproto.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
            self.step = looproto.create_global_step()

    class TorchModel(looproto.Module):
        def __init__(self) -> None:
            super().__init__(name="model")
            self.w = torch.nn.Parameter(torch.zeros(2, 3))
            self.step = looproto.Variable(torch.zeros((), dtype=torch.int64), trainable=False)

    source = NumpyModel()
    source.step.assign(9)
    with looproto.CheckpointManager(str(tmp_path / "np"), source) as manager:
        manager.save(checkpoint_number=9)
    target = TorchModel()
    looproto.CheckpointManager(str(tmp_path / "np"), target).restore(9)
    np.testing.assert_array_equal(target.w.detach().numpy(), source.w.numpy())
    assert int(target.step.numpy()) == 9 and isinstance(target.step.value, torch.Tensor)

    with torch.no_grad():
        target.w.mul_(-1)
    target.step.assign(11)
    with looproto.CheckpointManager(str(tmp_path / "torch"), target) as manager:
        manager.save(checkpoint_number=11)
    back = NumpyModel()
    looproto.CheckpointManager(str(tmp_path / "torch"), back).restore(11)
    np.testing.assert_array_equal(back.w.numpy(), -source.w.numpy())
    assert int(back.step) == 11 and isinstance(back.step.value, (np.ndarray, np.generic))


def test_bfloat16_parameters_round_trip_through_float32(tmp_path: Any) -> None:
    holder = looproto.Module(name="holder")
    holder.w = torch.nn.Parameter(torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16))
    with looproto.CheckpointManager(str(tmp_path), holder) as manager:
        manager.save(checkpoint_number=1)
    other = looproto.Module(name="holder")
    other.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    looproto.CheckpointManager(str(tmp_path), other).restore(1)
    assert other.w.dtype == torch.bfloat16
    torch.testing.assert_close(other.w.detach(), holder.w.detach(), rtol=0, atol=0)


# -- devices we do not have here ------------------------------------------------------------


def test_xla_path_marks_each_step_and_fetches_once(monkeypatch: Any) -> None:
    syncs: list[str] = []
    fetched: list[int] = []
    fake = types.ModuleType("torch_xla")
    fake.sync = lambda: syncs.append("sync")  # type: ignore[attr-defined]
    fake._XLAC = types.SimpleNamespace(  # type: ignore[attr-defined]
        _xla_get_cpu_tensors=lambda ts: fetched.append(len(ts)) or [t.clone() for t in ts]
    )
    core = types.ModuleType("torch_xla.core")
    core.xla_model = types.ModuleType("torch_xla.core.xla_model")  # type: ignore[attr-defined]
    fake.core = core  # type: ignore[attr-defined]
    for name, module in [("torch_xla", fake), ("torch_xla.core", core)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", core.xla_model)  # type: ignore[attr-defined]
    # The XLA device ops, on CPU tensors standing in for XLA ones.
    monkeypatch.setattr(
        torch_loop,
        "device_ops",
        lambda device, mode: torch_device._XlaOps(device),
    )
    trainer = Trainer(
        ArrayDataset(make_data(), 8, epochs=None), options=options(False, nan_check=True)
    )
    trainer.train(5)
    assert syncs == ["sync"] * 6  # One per step, one before the fetch.
    assert fetched == [4]  # global step, loss sum, NaN record (2): one fetch.
    assert int(trainer.global_step) == 5


def test_reduce_overhead_on_cuda_marks_cudagraph_steps() -> None:
    ops = torch_device.device_ops(torch.device("cuda", 0), "reduce-overhead")
    assert ops.cudagraph_steps
    assert not torch_device.device_ops(torch.device("cuda", 0), None).cudagraph_steps
    assert not torch_device.device_ops(torch.device("cpu"), "reduce-overhead").cudagraph_steps


def test_the_loop_accepts_any_iterable_of_batches() -> None:
    batches = [{"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}] * 3
    trainer = Trainer(itertools.chain(batches), options=EAGER)
    trainer.train(5)
    assert int(trainer.global_step) == 3  # The data ran out: a short loop, not an error.
