"""Private: what a checkpoint holds and how it is checked, for `looproto.checkpoint`.

Which reachable objects have a state to save (NumPy Generators, a backend's
`iterator_state` adapter, torchdata's loaders, anything with `get_state()` /
`set_state(state)`), how their states become JSON (bytes and torch tensors behind
marker keys) and back, the CRC-32s of arrays and of the JSON item itself, and the
restore-side helpers: parsing and validating the JSON item, comparing it with the
live tree, checking the arrays read back, and writing everything into the live tree
all-or-nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import zlib
from typing import Any

import numpy as np

from looproto.errors import CheckpointError, value_repr
from looproto.module import assign_variable, framework_backends, variable_to_numpy

_log = logging.getLogger("looproto")

_FORMAT = "looproto.checkpoint"
_FORMAT_VERSION = 1
# Markers of non-JSON values inside object states (a grain iterator's bytes, the
# torch tensors of a torchdata loader's sampler state).
_BYTES_KEY = "__looproto_bytes__"
_TENSOR_KEY = "__looproto_tensor__"


class _CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is unreadable or fails its integrity checks."""


# ----------------------------------------------------------------------------
# What is saved


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, np.random.Generator)


class _StateDictAdapter:
    """The iterator-state protocol on `state_dict()`/`load_state_dict()` (torchdata)."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def get_state(self) -> Any:
        return self._obj.state_dict()

    def set_state(self, state: Any) -> None:
        self._obj.load_state_dict(state)


_warned_unrestorable: set[type] = set()


def _torchdata_adapter(obj: Any) -> Any:
    """Adapts torchdata's `StatefulDataLoader` and its iterators, without importing torch.

    Only torchdata's classes: `torch.nn.Module` and optimizers have `state_dict` too,
    and their state is variables, not a data position.
    """
    if not type(obj).__module__.startswith("torchdata."):
        return None
    if not callable(getattr(obj, "state_dict", None)):
        return None
    if callable(getattr(obj, "load_state_dict", None)):
        return _StateDictAdapter(obj)
    if type(obj) not in _warned_unrestorable:
        _warned_unrestorable.add(type(obj))
        # A multi-worker iterator can only be restored through its loader, when the
        # loader is next iterated; an iterator created before the restore starts over.
        _log.warning(
            "The position of a %s cannot be restored in place; a resumed run starts it "
            "over. Checkpoint the `StatefulDataLoader` and call `iter()` on it after "
            "restoring, or use `num_workers=0`.",
            type(obj).__name__,
        )
    return None


def _state_adapter(obj: Any) -> Any:
    """What saves `obj`'s position: its backend's adapter, or `obj` itself, or None.

    A framework's objects are adapted by their backend first (optional
    `Backend.iterator_state(obj)`, e.g. for `tf.data` iterators), since a framework
    object with `get_state()` (a `torch.Generator`) may return framework values;
    then torchdata's loaders; then any object following the iterator-state protocol
    (callable `get_state()` and `set_state(state)`), such as grain's iterators and
    `looproto.data.ArrayIterator`. None when `obj` has no position to save.
    """
    if isinstance(obj, type):
        return None
    for backend in framework_backends(obj):
        adapt = getattr(backend, "iterator_state", None)
        adapter = adapt(obj) if adapt is not None else None
        if adapter is not None:
            return adapter
    adapter = _torchdata_adapter(obj)
    if adapter is not None:
        return adapter
    if callable(getattr(obj, "get_state", None)) and callable(getattr(obj, "set_state", None)):
        return obj
    return None


def _is_stateful(obj: Any) -> bool:
    return _is_generator(obj) or _state_adapter(obj) is not None


def _to_json(value: Any, where: str) -> Any:
    """`value` with NumPy scalars/arrays and tuples turned into JSON types.

    Raises:
        CheckpointError: Something is left that JSON cannot hold.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "numpy"):
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        return {
            _TENSOR_KEY: {
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "data": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        }
    if isinstance(value, (list, tuple)):
        return [_to_json(item, where) for item in value]
    if isinstance(value, dict):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(
                    f"The state of {where!r} has a dict key {key!r} of type "
                    f"{type(key).__name__}; expected string keys (JSON objects)."
                )
            converted[key] = _to_json(item, where)
        return converted
    raise CheckpointError(
        f"The state of {where!r} holds {value_repr(value)} of type {type(value).__name__}; "
        "expected JSON data (None, bool, int, float, str, lists, dicts with string keys, "
        "NumPy scalars or arrays, bytes, torch tensors)."
    )


def _from_json(value: Any, where: str) -> Any:
    """Undoes `_to_json`'s markers for bytes and torch tensors."""
    if isinstance(value, list):
        return [_from_json(item, where) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _BYTES_KEY in value:
        return base64.b64decode(value[_BYTES_KEY])
    if len(value) == 1 and _TENSOR_KEY in value:
        spec = value[_TENSOR_KEY]
        torch = sys.modules.get("torch")
        if torch is None:
            raise CheckpointError(
                f"The state of {where!r} holds a torch tensor, but torch is not imported."
            )
        array = np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"]))
        return torch.from_numpy(array.reshape(spec["shape"]).copy())
    return {key: _from_json(item, where) for key, item in value.items()}


def _crc32(array: np.ndarray[Any, Any]) -> int:
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(raw.data)


def _spec_text(shape: Any, dtype: Any) -> str:
    return f"shape={tuple(shape)} dtype={dtype}"


def _live_spec(variable: Any) -> tuple[tuple[int, ...], str]:
    """Shape and NumPy dtype name of a live variable, without copying when possible."""
    try:
        return tuple(int(d) for d in variable.shape), str(np.dtype(variable.dtype))
    except (AttributeError, TypeError):
        array = variable_to_numpy(variable)
        return tuple(array.shape), str(array.dtype)


# ----------------------------------------------------------------------------
# Restore checks


def _json_crc32(meta: dict[str, Any]) -> int:
    """CRC-32 of the canonical JSON of everything in `meta` but its own checksum."""
    body = {key: value for key, value in meta.items() if key != "crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return zlib.crc32(text.encode("utf-8"))


def _parse_meta(meta: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The array tree and object states of a JSON item, validated."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _CorruptCheckpointError(
            f"Checkpoint {where} has no valid looproto metadata item; received {value_repr(meta)}."
        )
    # Checkpoints of looproto before this checksum have none; they are checked as before.
    if "crc32" in meta and meta["crc32"] != _json_crc32(meta):
        raise _CorruptCheckpointError(
            f"Checkpoint {where} has a damaged metadata item: its CRC-32 does not match "
            f"the recorded {value_repr(meta['crc32'])}."
        )
    version = meta.get("version")
    if version != _FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {where} has format version {version!r}; this looproto reads version "
            f"{_FORMAT_VERSION}. Upgrade looproto to read it."
        )
    tree = meta.get("tree")
    objects = meta.get("objects")
    if not isinstance(tree, dict) or not isinstance(objects, dict):
        raise _CorruptCheckpointError(f"Checkpoint {where} has a malformed metadata item.")
    for path, spec in tree.items():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("shape"), list)
            and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("crc32"), int)
        ):
            raise _CorruptCheckpointError(
                f"Checkpoint {where} has a malformed entry for {path!r}: {value_repr(spec)}."
            )
    for path, entry in objects.items():
        if not (isinstance(entry, dict) and "state" in entry and "kind" in entry):
            raise _CorruptCheckpointError(
                f"Checkpoint {where} has a malformed state for {path!r}: {value_repr(entry)}."
            )
    return tree, objects


def _check_matches(
    tree: dict[str, Any],
    objects: dict[str, Any],
    variables: dict[str, Any],
    live_objects: dict[str, Any],
    where: str,
) -> None:
    """Raises `CheckpointError` listing every path where checkpoint and live tree differ."""
    problems: list[str] = []
    for path in sorted(set(variables) - set(tree)):
        shape, dtype = _live_spec(variables[path])
        problems.append(f"  {path!r}: not in the checkpoint (live {_spec_text(shape, dtype)})")
    for path in sorted(set(tree) - set(variables)):
        spec = tree[path]
        problems.append(
            f"  {path!r}: in the checkpoint ({_spec_text(spec['shape'], spec['dtype'])}) "
            "but not a live variable"
        )
    for path in sorted(set(tree) & set(variables)):
        spec = tree[path]
        shape, dtype = _live_spec(variables[path])
        if tuple(spec["shape"]) != shape or spec["dtype"] != dtype:
            problems.append(
                f"  {path!r}: checkpoint {_spec_text(spec['shape'], spec['dtype'])}, "
                f"live {_spec_text(shape, dtype)}"
            )
    for path in sorted(set(live_objects) - set(objects)):
        problems.append(f"  {path!r}: object state not in the checkpoint")
    for path in sorted(set(objects) - set(live_objects)):
        problems.append(f"  {path!r}: object state in the checkpoint but no live object")
    for path in sorted(set(objects) & set(live_objects)):
        live_kind = "numpy_generator" if _is_generator(live_objects[path]) else "state"
        if objects[path]["kind"] != live_kind:
            problems.append(
                f"  {path!r}: checkpoint holds a {objects[path]['kind']!r} state, live object "
                f"is a {live_kind!r}"
            )
    if problems:
        raise CheckpointError(
            f"Checkpoint {where} does not match the variables of `checkpoint` "
            f"({len(problems)} difference(s)); nothing was restored:\n" + "\n".join(problems)
        )


def _set_object_state(obj: Any, state: Any, path: str | None = None) -> None:
    """Sets `state`; from a checkpoint's JSON (`path` given) it is decoded first."""
    if _is_generator(obj):
        obj.bit_generator.state = state
    else:
        _state_adapter(obj).set_state(state if path is None else _from_json(state, path))


def _get_object_state(obj: Any) -> Any:
    return obj.bit_generator.state if _is_generator(obj) else _state_adapter(obj).get_state()


def _write_all(
    variables: dict[str, Any],
    arrays: dict[str, Any],
    live_objects: dict[str, Any],
    objects: dict[str, Any],
    where: str,
) -> None:
    """Writes a checked checkpoint into the live tree; undoes it all if any write fails.

    A write can fail although the tree matched: an object may refuse a state of the
    same kind but another type (an `ArrayIterator` handed a `tf.data` iterator's state,
    from a checkpoint of another backend's pipeline; a Generator whose bit generator
    changed). Object states go first (small, and the likeliest to refuse); each
    variable's value is kept just before it is overwritten, so what was written can be
    put back.

    Raises:
        CheckpointError: A write failed; the path and the reason are named.
    """
    written_objects: list[tuple[Any, Any]] = []
    written_variables: list[tuple[Any, Any]] = []
    current, rejected = "", ""
    try:
        for path, obj in live_objects.items():
            current = path
            rejected = (
                f"; the live object at {path!r} ({type(obj).__name__}) rejected its saved "
                "state (was its type changed?)"
            )
            previous = _get_object_state(obj)
            _set_object_state(obj, objects[path]["state"], path)
            written_objects.append((obj, previous))
        rejected = ""
        for path, variable in variables.items():
            current = path
            previous = variable_to_numpy(variable)
            assign_variable(variable, arrays[path])
            written_variables.append((variable, previous))
    except Exception as err:
        for variable, previous in reversed(written_variables):
            assign_variable(variable, previous)
        for obj, previous in reversed(written_objects):
            _set_object_state(obj, previous)
        raise CheckpointError(
            f"Checkpoint {where} could not be restored: writing {current!r} failed "
            f"({type(err).__name__}: {err}){rejected}. Nothing was restored."
        ) from err


def _check_arrays(arrays: dict[str, Any], tree: dict[str, Any], where: str) -> None:
    """Raises `_CorruptCheckpointError` unless `arrays` are exactly what `tree` records."""
    problems: list[str] = []
    for path in sorted(set(tree) - set(arrays)):
        problems.append(f"  {path!r}: missing from the array data")
    for path in sorted(set(arrays) - set(tree)):
        problems.append(f"  {path!r}: in the array data but not in the metadata")
    for path in sorted(set(tree) & set(arrays)):
        spec = tree[path]
        array = arrays[path]
        if not isinstance(array, np.ndarray):
            problems.append(f"  {path!r}: read back as {type(array).__name__}, not an array")
            continue
        if tuple(array.shape) != tuple(spec["shape"]) or str(array.dtype) != spec["dtype"]:
            problems.append(
                f"  {path!r}: read {_spec_text(array.shape, array.dtype)}, recorded "
                f"{_spec_text(spec['shape'], spec['dtype'])}"
            )
            continue
        crc = _crc32(array)
        if crc != spec["crc32"]:
            problems.append(f"  {path!r}: CRC-32 {crc} does not match the recorded {spec['crc32']}")
    if problems:
        raise _CorruptCheckpointError(
            f"Checkpoint {where} is corrupted ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
