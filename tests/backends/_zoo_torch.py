"""The torch objects of the state zoo (see `_zoo.py`): real optimizers, schedulers, scalers.

Eager cases resume bit for bit; so do compiled ones whose step sees one batch shape, or
that fix `dynamic`. With automatic dynamic shapes and a batch shape that changes (a
short last batch), a resumed process compiles a static kernel for the first shape it
meets where the uninterrupted one had already switched to a dynamic one: that case is
held to a bound instead (see `docs/reliability.md`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import looproto  # noqa: E402
from looproto.data import ArrayDataset  # noqa: E402
from tests.backends._zoo import Case  # noqa: E402

L = torch.optim.lr_scheduler


def data(n: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5], [0.3]], np.float32))
    return {"x": x, "y": y.astype(np.float32)}


class Net(torch.nn.Module):
    def __init__(self, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(4, 16, bias=bias)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(dropout)
        self.l2 = torch.nn.Linear(16, 1)

    def forward(self, x: Any) -> Any:
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(x)))))


class Trainer(looproto.StandardTrainer):
    """A regression step; subclasses choose the optimizer and what the step also does."""

    def __init__(self, *, batch: int = 16, n: int = 96, drop_remainder: bool = True, **opts: Any):
        dataset = ArrayDataset(
            data(n), batch, shuffle=True, seed=3, epochs=None, drop_remainder=drop_remainder
        )
        compiled = bool(opts)
        options = looproto.StandardTrainerOptions(
            use_compiled_step=compiled, use_compiled_loop=compiled, backend_options=opts
        )
        super().__init__(dataset, options=options)
        self.model = self.make_model()
        self.global_step = looproto.create_global_step()

    def make_model(self) -> Any:
        return Net()

    def loss(self, batch: Any) -> Any:
        return torch.mean((self.model(batch["x"]) - batch["y"]) ** 2)

    def train_step(self, iterator: Any) -> Any:
        loss = self.loss(next(iterator))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.after_step(loss)
        self.global_step.assign_add(1)
        return {"loss": loss}

    def after_step(self, loss: Any) -> None:
        self.scheduler.step()


def group_lrs(trainer: Any) -> list[float]:
    return [float(g["lr"]) for g in trainer.optimizer.param_groups]


# -- schedulers ------------------------------------------------------------------------


class WarmupCosine(Trainer):
    """AdamW, warm-up then cosine: `SequentialLR` over `LinearLR` and `CosineAnnealingLR`."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.AdamW(self.model.named_parameters(), lr=0.02)
        warmup = L.LinearLR(self.optimizer, start_factor=0.1, total_iters=4)
        cosine = L.CosineAnnealingLR(self.optimizer, T_max=10, eta_min=1e-4)
        self.scheduler = L.SequentialLR(self.optimizer, [warmup, cosine], milestones=[4])


class Chained(Trainer):
    """SGD with Nesterov momentum, `ChainedScheduler(ExponentialLR, StepLR)`."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.SGD(
            self.model.named_parameters(), lr=0.05, momentum=0.9, nesterov=True
        )
        self.scheduler = L.ChainedScheduler(
            [L.ExponentialLR(self.optimizer, 0.95), L.StepLR(self.optimizer, 3, 0.5)]
        )


class Plateau(Trainer):
    """Adam with `ReduceLROnPlateau` on the loss (strings `mode`, `threshold_mode`, `best`)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.Adam(self.model.named_parameters(), lr=0.05)
        self.scheduler = L.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.5, patience=1, threshold=0.2, cooldown=1
        )

    def after_step(self, loss: Any) -> None:
        self.scheduler.step(float(loss.detach()))


class Warmup:
    """A callable *object* as a `LambdaLR` factor: its `__dict__` is scheduler state."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls = 0

    def __call__(self, epoch: int) -> float:
        self.calls += 1  # State the factor depends on: lost unless saved.
        return min(1.0, (epoch + 1) / self.steps) * 0.98**self.calls


class Lambda(Trainer):
    """`LambdaLR` over two param groups: a stateful callable object and a plain lambda."""

    def __init__(self) -> None:
        super().__init__()
        groups = [
            {"params": list(self.model.l1.parameters()) + list(self.model.bn.parameters())},
            {"params": list(self.model.l2.parameters()), "lr": 0.01},
        ]
        self.optimizer = torch.optim.RMSprop(groups, lr=0.01, momentum=0.5)
        self.scheduler = L.LambdaLR(self.optimizer, [Warmup(5), lambda epoch: 0.9**epoch])


class OneCycle(Trainer):
    """`OneCycleLR` (strings and lists of dicts in its state) cycling SGD's momentum too."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.scheduler = L.OneCycleLR(self.optimizer, max_lr=0.1, total_steps=20)


def one_cycle_lrs(trainer: Any) -> list[float]:
    return group_lrs(trainer) + [float(g["momentum"]) for g in trainer.optimizer.param_groups]


# -- scaler, averaging, generators --------------------------------------------------------


class Scaled(Trainer):
    """`torch.amp.GradScaler` whose scale grows every step until gradients overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.Adam(self.model.named_parameters(), lr=0.01)
        self.scaler = torch.amp.GradScaler(
            "cpu", init_scale=2.0**122, growth_factor=2.0, backoff_factor=0.25, growth_interval=1
        )

    def train_step(self, iterator: Any) -> Any:
        loss = self.loss(next(iterator))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.global_step.assign_add(1)
        return {"loss": loss}


def scaled_lrs(trainer: Any) -> list[float]:
    return [*group_lrs(trainer), trainer.scaler.get_scale()]


class Averaged(Trainer):
    """SWA: `AveragedModel` from step 3 on, with `SWALR` annealing the learning rate."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.SGD(self.model.named_parameters(), lr=0.05, momentum=0.9)
        self.swa_model = torch.optim.swa_utils.AveragedModel(self.model)
        self.scheduler = torch.optim.swa_utils.SWALR(
            self.optimizer, swa_lr=0.01, anneal_epochs=4, anneal_strategy="cos"
        )

    def after_step(self, loss: Any) -> None:
        if int(self.global_step) >= 2:
            self.swa_model.update_parameters(self.model)
            self.scheduler.step()


class Generators(Trainer):
    """Dropout (torch's default generator) and input noise from a `torch.Generator`."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.Adam(self.model.named_parameters(), lr=0.01)
        self.default_rng = torch.default_generator  # What `Dropout` draws from.
        self.noise_rng = torch.Generator().manual_seed(7)

    def make_model(self) -> Any:
        return Net(dropout=0.3)

    def loss(self, batch: Any) -> Any:
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape, generator=self.noise_rng)
        return torch.mean((self.model(x) - batch["y"]) ** 2)

    def after_step(self, loss: Any) -> None:
        pass


# -- torch.compile ------------------------------------------------------------------------


class Compiled(Trainer):
    """Adam and `StepLR` in an inductor-compiled step."""

    def __init__(self, **opts: Any) -> None:
        super().__init__(backend="inductor", **opts)
        self.optimizer = torch.optim.Adam(self.model.named_parameters(), lr=0.01)
        self.scheduler = L.StepLR(self.optimizer, 3, gamma=0.5)

    def make_model(self) -> Any:
        # No bias before the BatchNorm (which cancels it): its gradient would be rounding
        # noise that Adam scales up to whole steps, making any last-bit difference huge.
        return Net(bias=False)


def changing_shapes(**opts: Any) -> Any:
    # 100 examples in batches of 16: every 7th batch has 4 (a short last batch).
    return Compiled(n=100, drop_remainder=False, **opts)


def reset_dynamo() -> None:
    torch._dynamo.reset()


CASES = [
    Case("sequential_lr", WarmupCosine, group_lrs),
    Case("chained_scheduler", Chained, group_lrs),
    Case("reduce_lr_on_plateau", Plateau, group_lrs),
    Case("lambda_lr", Lambda, group_lrs),
    Case("one_cycle_lr", OneCycle, one_cycle_lrs),
    Case("grad_scaler", Scaled, scaled_lrs),
    Case("averaged_model_swalr", Averaged, group_lrs),
    Case("generators_dropout", Generators, group_lrs),
    Case("compiled_fixed_shapes", Compiled, group_lrs, reset=reset_dynamo),
    Case(
        "compiled_changing_shapes_static",
        lambda: changing_shapes(dynamic=False),
        group_lrs,
        reset=reset_dynamo,
    ),
    Case(
        "compiled_changing_shapes_automatic",
        changing_shapes,
        group_lrs,
        bound=1e-4,
        reset=reset_dynamo,
    ),
]
