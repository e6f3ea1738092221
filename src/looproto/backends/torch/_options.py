"""The torch `backend_options`: what each means (`BACKEND_OPTIONS`) and their checking.

`parse_backend_options` turns the user's mapping into the loop's settings, or raises
`ConfigError` naming the option at fault, before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from looproto.backends.torch._device import xla_available
from looproto.backends.torch._errors import first_line
from looproto.errors import BackendNotAvailableError, ConfigError

BACKEND_OPTIONS: dict[str, str] = {
    "mode": 'the `torch.compile` mode: None (default), "default", "reduce-overhead" '
    '(CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs"',
    "fullgraph": "compile the step as one graph; a graph break raises `ProtocolError` "
    "(default False)",
    "dynamic": "`torch.compile`'s `dynamic`: None (default: automatic), True or False",
    "backend": 'the `torch.compile` backend (default "inductor"; "openxla" on XLA '
    'devices; "eager"/"aot_eager" to debug)',
    "device": "where batches and lifted variables go (default: the device of the "
    'module\'s tensors, else "cpu")',
    "nan_check": "raise `NonFiniteError` naming the first step whose outputs were not "
    "finite, checked on device, read once per loop (default False)",
    "trace_autograd": "let Dynamo trace `backward()`/`torch.autograd.grad` into the graph "
    "(`torch._dynamo.config.trace_autograd_ops`; default False)",
}
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_backend_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ConfigError(
            f"Unknown torch `backend_options` {unknown}; expected some of "
            f"{sorted(BACKEND_OPTIONS)}."
        )
    mode = options.get("mode")
    if mode not in _MODES:
        raise ConfigError(f'`backend_options["mode"]` must be one of {_MODES}; received {mode!r}.')
    for key in ("fullgraph", "nan_check", "trace_autograd"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(
                f'`backend_options["{key}"]` must be a bool; received {options[key]!r}.'
            )
    dynamic = options.get("dynamic")
    if dynamic not in (None, True, False):
        raise ConfigError(
            f'`backend_options["dynamic"]` must be None, True or False; received {dynamic!r}.'
        )
    backend = options.get("backend")
    if backend is not None and not callable(backend):
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(
                f'`backend_options["backend"]` must be a `torch.compile` backend name or a '
                f"callable; received {backend!r}; known names: {known}."
            )
    device = options.get("device")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f'`backend_options["device"]` must name a torch device (e.g. "cpu", "cuda:0"); '
                f"received {device!r}: {first_line(err)}"
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f'`backend_options["device"]` is {str(device)!r} but CUDA is not available '
                f"to this torch ({torch.__version__})."
            )
        if device.type == "xla" and not xla_available():
            raise BackendNotAvailableError(
                f'`backend_options["device"]` is {str(device)!r}, which needs torch_xla; '
                f"install a torch_xla matching torch {torch.__version__}."
            )
    return {
        "mode": mode,
        "fullgraph": options.get("fullgraph", False),
        "dynamic": dynamic,
        "backend": backend,
        "device": device,
        "nan_check": options.get("nan_check", False),
        "trace_autograd": options.get("trace_autograd", False),
    }
