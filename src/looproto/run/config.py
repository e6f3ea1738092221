"""Run configs: one TOML file says what to train, on which backend, for how long.

A config names *factories* (`"package.module:function"`) that build the trainer and
evaluator, and everything the outer loop needs: steps, `steps_per_loop`, intervals,
directories, checkpoint options, the seed, and per-backend options. Changing the
`backend` line swaps the framework; the Controller, summaries and checkpoints stay
the same::

    backend = "numpy"            # or "jax", "tensorflow", "torch"; LOOPROTO_BACKEND overrides
    model_dir = "runs/mlp"
    seed = 0

    [trainer]
    factory = "looproto.examples.mlp:trainer"
    learning_rate = 0.05         # every other key is a keyword argument of the factory

    [evaluator]
    factory = "looproto.examples.mlp:evaluator"

    [train]
    steps = 2000
    steps_per_loop = 100
    eval_interval = 500

    [checkpoint]
    interval = 500
    max_to_keep = 3
    keep_best = 2                # also keep the 2 best by an evaluation output
    best_metric = "eval_loss"
    best_mode = "min"

    [early_stopping]             # stop when an evaluation output stops improving
    metric = "eval_loss"
    mode = "min"
    patience = 3

    [backend_options.jax]        # passed only when that backend is active
    data = "device"

    [distributed]                # multi-process runs (see `looproto.distributed`)
    num_processes = 2            # `looproto train` spawns 2 local workers; --num-processes
    timeout = 300                # seconds a process waits for the others

A factory receives its own keys as keyword arguments, plus whichever of `backend`,
`backend_options`, `seed` and `model_dir` its signature names; the evaluator's factory
also gets `trainer` if it names it (to share the model). The trainer must expose its
step counter as `global_step`.

Precedence, lowest first: the file, then `LOOPROTO_BACKEND` (for `backend`), then
`--set key=value` overrides (`--set train.steps=1000`).

Every mistake is a `ConfigError` whose message starts with the file and the key:
unknown keys (with a did-you-mean suggestion), wrong types, factories that do not
import, keyword arguments the factory does not take, backends that are not installed.
(The file runs past 500 lines: the schema, its checks and the factory calls are one
concept, the config file's meaning.)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from types import UnionType
from typing import Any

from looproto import backends
from looproto.errors import (
    BackendNotAvailableError,
    ConfigError,
    LooprotoError,
    StorageError,
    value_repr,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_UNIONS = (typing.Union, UnionType)

__all__ = [
    "CheckpointConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "EvaluateConfig",
    "FactoryConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "call_factory",
    "load",
    "load_factory",
    "parse",
]


@dataclasses.dataclass(frozen=True)
class FactoryConfig:
    """`factory = "package.module:function"` and the keyword arguments it gets."""

    factory: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The outer training loop (see `Controller.train` / `train_and_evaluate`).

    Attributes:
        steps: The global step to train to; -1 trains until the data ends.
        steps_per_loop: Steps per inner loop (one compiled call).
        summary_interval: Write train summaries every this many steps (None: every loop).
        eval_interval: Evaluate every this many steps (None: only at the end; needs an
            evaluator).
        eval_steps: Steps per evaluation during training (-1: until the data ends).
        check_finite: Stop (exit status 5) at the first inner loop whose outputs are
            NaN or infinite, and never save a checkpoint whose variables are.
    """

    steps: int
    steps_per_loop: int = 100
    summary_interval: int | None = None
    eval_interval: int | None = None
    eval_steps: int = -1
    check_finite: bool = True


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """`looproto evaluate`: steps per evaluation and how long `--continuous` waits."""

    steps: int = -1
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints under `<model_dir>/checkpoints` (see `CheckpointManager`)."""

    enabled: bool = True
    interval: int | None = None
    max_to_keep: int | None = 5
    async_save: bool = False
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop training when an evaluation output stops improving (`actions.EarlyStopping`).

    The history is kept in `<model_dir>/early_stopping.json`, so a resumed run goes on
    counting, and a run that stopped stays stopped.
    """

    metric: str
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs on the backend's own engine (see `looproto.distributed`).

    Attributes:
        num_processes: `looproto train` spawns this many local worker processes
            (`--num-processes` overrides it). Under `torchrun` (or another launcher
            that sets the engine's environment) the launcher decides instead.
        timeout: Seconds a process waits for the others to start, at barriers and
            in collectives; a process that died or hangs makes the others fail with
            `DistributedError` within about this long.
    """

    num_processes: int = 1
    timeout: float = 300.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run. See the module docstring for the file format."""

    trainer: FactoryConfig | None
    train: TrainConfig | None = None
    evaluator: FactoryConfig | None = None
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    early_stopping: EarlyStoppingConfig | None = None
    backend: str | None = None
    model_dir: str = os.path.join("runs", "looproto")
    seed: int = 0
    backend_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    source: str = "<config>"

    @property
    def checkpoint_dir(self) -> str:
        """`<model_dir>/checkpoints`."""
        return os.path.join(self.model_dir, "checkpoints")

    @property
    def summary_dir(self) -> str:
        """`<model_dir>/summaries` (`train/` and `eval/` below it)."""
        return os.path.join(self.model_dir, "summaries")

    def active_backend_options(self) -> dict[str, Any]:
        """The `[backend_options.<backend>]` table of the active backend (maybe empty)."""
        return dict(self.backend_options.get(self.backend_name(), {}))

    def backend_name(self) -> str:
        """The configured backend, else `LOOPROTO_BACKEND`, else `"numpy"`."""
        return self.backend or backends.default_name()


# ----------------------------------------------------------------------------
# Reading and validating


# The keys of each table with their expected types, for messages and checks.
_SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
    "early_stopping": EarlyStoppingConfig,
}
_TOP_LEVEL = {
    "backend": (str,),
    "model_dir": (str,),
    "seed": (int,),
}
_TABLES = ("trainer", "evaluator", "backend_options", *_SECTIONS)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    import_backend: bool = True,
) -> RunConfig:
    """Reads and validates the TOML config at `path`, then applies `overrides`.

    Args:
        path: The config file.
        overrides: `"key=value"` strings (`"train.steps=1000"`); the value is TOML
            (`1000`, `"jax"`, `true`), or a bare string.
        environ: Where `LOOPROTO_BACKEND` is read (default: `os.environ`).
        import_backend: Check that the backend's framework imports (False: only that
            the backend exists; a launcher that only spawns workers skips the import).

    Raises:
        ConfigError: The file is missing or not TOML, or a value is invalid.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file.") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory; expected a TOML config file.") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the config file: {err.strerror}.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: not valid TOML: byte {err.start} is not UTF-8 text "
            f"({err.object[err.start : err.start + 1]!r})."
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}.") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: not a usable config: its arrays or tables are nested too deeply."
        ) from None
    env = os.environ if environ is None else environ
    if env.get(backends.ENV_VAR):
        raw["backend"] = env[backends.ENV_VAR]
    apply_overrides(raw, overrides, source)
    return parse(raw, source, import_backend=import_backend)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """Applies `"a.b=value"` overrides to the raw TOML tables, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{source}: `--set {item}`: expected `--set key=value`, e.g. "
                "`--set train.steps=1000`."
            )
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: `--set backend=jax`
        except RecursionError:
            raise ConfigError(
                f"{source}: `--set {key}=...`: the value is nested too deeply."
            ) from None
        table = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: `--set {item}`: `{part}` is not a table.")
            table = child
        table[parts[-1]] = value


def parse(
    raw: Mapping[str, Any], source: str = "<config>", *, import_backend: bool = True
) -> RunConfig:
    """Validates a config already read as a dict (see `load`)."""
    _check_keys(raw, [*_TOP_LEVEL, *_TABLES], source, "")
    values: dict[str, Any] = {"source": source}
    for key, types in _TOP_LEVEL.items():
        if key in raw:
            values[key] = _check_type(raw[key], types, source, key)
    if "backend" in values:
        _check_backend(values["backend"], source, import_backend)
    for name in ("trainer", "evaluator"):
        if name in raw:
            values[name] = _factory(raw[name], source, name)
    for name, cls in _SECTIONS.items():
        if name in raw:
            values[name] = _section(raw[name], cls, source, name)
    if "backend_options" in raw:
        values["backend_options"] = _backend_options(raw["backend_options"], source)
    values.setdefault("trainer", None)
    config = RunConfig(**values)
    _check_combinations(config)
    return config


def _check_keys(table: Mapping[str, Any], known: Sequence[str], source: str, prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"{source}: unknown key `{prefix}{key}`; expected one of {sorted(known)}.{hint}"
            )


def _type_names(accepted: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if float in accepted:  # "a number" covers the integers
        accepted = tuple(t for t in accepted if t is not int)
    return " or ".join(names.get(t, t.__name__) for t in accepted)


def _check_type(value: Any, types: tuple[type, ...], source: str, key: str) -> Any:
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # `true` is an int to Python, never to a config reader.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ConfigError(
            f"{source}: `{key}` must be {_type_names(types)}; received {value_repr(value)}."
        )
    return value


def _check_backend(name: str, source: str, import_backend: bool = True) -> None:
    if not import_backend:
        canonical = backends.canonical_name(name)
        if canonical not in backends.available():
            raise ConfigError(
                f"{source}: `backend`: unknown backend {name!r}; expected one of "
                f"{backends.available()}."
            )
        return
    try:
        backends.get(name)
    except BackendNotAvailableError as err:
        raise ConfigError(f"{source}: `backend = {name!r}`: {err}") from None
    except ConfigError:
        raise ConfigError(
            f"{source}: `backend`: unknown backend {name!r}; expected one of "
            f"{backends.available()}."
        ) from None


def _factory(table: Any, source: str, name: str) -> FactoryConfig:
    if isinstance(table, str):
        table = {"factory": table}
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{source}: `{name}` must be a table with a `factory` key; received "
            f"{value_repr(table)}."
        )
    if "factory" not in table:
        raise ConfigError(
            f"{source}: `{name}.factory` is missing; expected "
            '`factory = "package.module:function"`.'
        )
    factory = _check_type(table["factory"], (str,), source, f"{name}.factory")
    module, sep, attribute = factory.partition(":")
    # Absolute dotted names only: a relative or path-like module cannot be imported.
    if not sep or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attribute):
        raise ConfigError(
            f'{source}: `{name}.factory` must look like "package.module:function" (dotted '
            f"Python names, no relative or file paths); received {factory!r}."
        )
    kwargs = {key: value for key, value in table.items() if key != "factory"}
    return FactoryConfig(factory=factory, kwargs=kwargs)


def _section(table: Any, cls: type, source: str, name: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: `{name}` must be a table; received {value_repr(table)}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(table, list(fields), source, f"{name}.")
    hints = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        types = hints[key]
        if value is None and type(None) in types:
            values[key] = None
        else:
            accepted = tuple(t for t in types if t is not type(None))
            values[key] = _check_type(value, accepted, source, f"{name}.{key}")
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise ConfigError(f"{source}: `{name}.{missing[0]}` is required.")
    return cls(**values)


def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Field name -> accepted runtime types, from the dataclass annotations."""
    out: dict[str, tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        out[name] = tuple(args) if args else (hint,)
    return out


def _backend_options(table: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{source}: `backend_options` must be a table of per-backend tables "
            f"(`[backend_options.jax]`); received {value_repr(table)}."
        )
    known = backends.available()
    out: dict[str, dict[str, Any]] = {}
    for name, options in table.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `backend_options.{close[0]}`?" if close else ""
            raise ConfigError(
                f"{source}: `backend_options.{name}`: no backend is called {name!r}; "
                f"expected one of {known}.{hint}"
            )
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"{source}: `backend_options.{name}` must be a table; received "
                f"{value_repr(options)}."
            )
        out[name] = dict(options)
    return out


def _positive(value: int | None, source: str, key: str, allow_all: bool = False) -> None:
    if value is None or (allow_all and value == -1):
        return
    if value < 1:
        expected = "a positive integer" + (" or -1" if allow_all else "")
        raise ConfigError(f"{source}: `{key}` must be {expected}; received {value}.")


def _check_combinations(config: RunConfig) -> None:
    source = config.source
    if config.train is not None:
        train = config.train
        _positive(train.steps, source, "train.steps", allow_all=True)
        _positive(train.steps_per_loop, source, "train.steps_per_loop")
        _positive(train.summary_interval, source, "train.summary_interval")
        _positive(train.eval_interval, source, "train.eval_interval")
        _positive(train.eval_steps, source, "train.eval_steps", allow_all=True)
        if train.summary_interval is not None and train.summary_interval % train.steps_per_loop:
            raise ConfigError(
                f"{source}: `train.summary_interval` ({train.summary_interval}) must be a "
                f"multiple of `train.steps_per_loop` ({train.steps_per_loop})."
            )
        if train.eval_interval is not None and config.evaluator is None:
            raise ConfigError(
                f"{source}: `train.eval_interval` is set but there is no `[evaluator]`."
            )
    _positive(config.evaluate.steps, source, "evaluate.steps", allow_all=True)
    timeout = config.evaluate.timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise ConfigError(
            f"{source}: `evaluate.timeout` must be >= 0 seconds (a finite number; leave it "
            f"out to wait forever); received {timeout}."
        )
    _positive(config.distributed.num_processes, source, "distributed.num_processes")
    if not (config.distributed.timeout > 0 and math.isfinite(config.distributed.timeout)):
        raise ConfigError(
            f"{source}: `distributed.timeout` must be > 0 seconds; received "
            f"{config.distributed.timeout}."
        )
    _positive(config.checkpoint.interval, source, "checkpoint.interval")
    _positive(config.checkpoint.max_to_keep, source, "checkpoint.max_to_keep")
    _check_research(config)
    if config.seed < 0:
        raise ConfigError(f"{source}: `seed` must be >= 0; received {config.seed}.")


def _check_research(config: RunConfig) -> None:
    """`[early_stopping]` and the keep-best keys of `[checkpoint]`."""
    source, checkpoint, early = config.source, config.checkpoint, config.early_stopping
    _positive(checkpoint.keep_best, source, "checkpoint.keep_best")
    if checkpoint.keep_best is not None and checkpoint.best_metric is None:
        raise ConfigError(
            f"{source}: `checkpoint.keep_best` needs `checkpoint.best_metric`, the evaluation "
            'output that ranks checkpoints (e.g. `best_metric = "eval_loss"`).'
        )
    modes = ("max", "min")
    if checkpoint.best_mode not in modes:
        raise ConfigError(
            f"{source}: `checkpoint.best_mode` must be 'max' or 'min'; received "
            f"{checkpoint.best_mode!r}."
        )
    if checkpoint.best_metric is not None and config.evaluator is None:
        raise ConfigError(
            f"{source}: `checkpoint.best_metric` is set but there is no `[evaluator]`."
        )
    if early is None:
        return
    if config.evaluator is None:
        raise ConfigError(
            f"{source}: `[early_stopping]` watches the evaluations, but there is no `[evaluator]`."
        )
    if early.mode not in modes:
        raise ConfigError(
            f"{source}: `early_stopping.mode` must be 'max' or 'min'; received {early.mode!r}."
        )
    _positive(early.patience, source, "early_stopping.patience")
    if early.min_delta < 0:
        raise ConfigError(
            f"{source}: `early_stopping.min_delta` must be >= 0; received {early.min_delta}."
        )


# ----------------------------------------------------------------------------
# Factories


def load_factory(spec: str, source: str = "<config>", key: str = "factory") -> Callable[..., Any]:
    """Imports `"package.module:attribute"` and returns the callable.

    Raises:
        ConfigError: The module does not import, has no such attribute, or it is not
            callable.
    """
    module_name, _, attribute = spec.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attribute):
        raise ConfigError(
            f'{source}: `{key}` must look like "package.module:function" (dotted Python '
            f"names, no relative or file paths); received {spec!r}."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or whatever the module raised on import
        raise ConfigError(
            f"{source}: `{key}` = {spec!r}: module {module_name!r} does not import "
            f"({type(err).__name__}: {_first_line(err)})."
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean `{module_name}:{close[0]}`?" if close else ""
            raise ConfigError(
                f"{source}: `{key}` = {spec!r}: {module_name!r} has no attribute "
                f"{attribute!r}.{hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{source}: `{key}` = {spec!r} is not callable.")
    return obj  # type: ignore[no-any-return]


def call_factory(
    factory_config: FactoryConfig,
    config: RunConfig,
    key: str,
    **injectable: Any,
) -> Any:
    """Calls the factory with its keys plus whichever `injectable` names it accepts.

    `injectable` adds to `backend`, `backend_options`, `seed` and `model_dir`, which
    every factory may ask for by naming them.
    """
    factory = load_factory(factory_config.factory, config.source, f"{key}.factory")
    available = {
        "backend": config.backend_name(),
        "backend_options": config.active_backend_options(),
        "seed": config.seed,
        "model_dir": config.model_dir,
        **injectable,
    }
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: pass its keys only
        return factory(**factory_config.kwargs)
    params = signature.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name in factory_config.kwargs:
        if name not in params and not takes_kwargs:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean `{key}.{close[0]}`?" if close else ""
            raise ConfigError(
                f"{config.source}: unknown key `{key}.{name}`: {factory_config.factory} "
                f"takes {names}.{hint}"
            )
        if name in available:
            raise ConfigError(
                f"{config.source}: `{key}.{name}` is set by looproto (from the top level "
                "of the config); remove it from the table."
            )
    _check_annotated_types(factory, factory_config, config.source, key)
    kwargs = dict(factory_config.kwargs)
    kwargs.update({name: value for name, value in available.items() if name in params})
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise ConfigError(
            f"{config.source}: `{key}.factory` = {factory_config.factory}: {err}."
        ) from None
    try:
        return factory(**kwargs)
    except LooprotoError:
        raise
    except Exception as err:
        message = (
            f"{config.source}: `{key}.factory` = {factory_config.factory} raised "
            f"{type(err).__name__}: {_first_line(err)} (--debug shows the traceback)."
        )
        # A file it could not read is the environment's fault, not the config's.
        raise (StorageError if isinstance(err, OSError) else ConfigError)(message) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


# Annotations a config value can be checked against, with what they accept.
_SIMPLE_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
}


def _check_annotated_types(
    factory: Callable[..., Any], factory_config: FactoryConfig, source: str, key: str
) -> None:
    """Checks each config value against the factory's annotation, where it is simple.

    A value the factory would only trip over later (`learning_rate = "fast"` reaching
    the first step) is reported now, naming the key.
    """
    import typing

    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable annotations: leave the checking to the factory
        return
    for name, value in factory_config.kwargs.items():
        hint = hints.get(name)
        if hint is None:
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in _UNIONS else (hint,)
        accepted: list[type] = []
        for option in options:
            if option is type(None):
                accepted.append(type(None))
            elif option in _SIMPLE_TYPES:
                accepted.extend(_SIMPLE_TYPES[option])
            else:
                break  # something richer (a mapping, a class): not checked here
        else:
            if isinstance(value, bool) and bool not in accepted:
                ok = False
            else:
                ok = isinstance(value, tuple(accepted))
            if not ok:
                wanted = _type_names(tuple(t for t in accepted if t is not type(None)))
                raise ConfigError(
                    f"{source}: `{key}.{name}` must be {wanted} ({factory_config.factory} "
                    f"takes `{name}: {_hint_text(hint)}`); received {value_repr(value)}."
                )


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
