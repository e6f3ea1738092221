"""The checkpoint format: what a checkpoint holds and how it is checked.

Which reachable objects have a state to save (NumPy Generators, a backend's
`iterator_state` adapter, anything with `get_state()` / `set_state(state)`, and the
`Unsaveable` leaves that make a save fail), how their states become JSON (bytes,
framework values through their backend's `SupportsStateJSON`, and variables of the
tree as references to their paths, behind tagged keys) and back, the CRC-32s of arrays
and of the JSON item itself, and the restore-side helpers (the live tree's side is in
`_live.py`): parsing and validating the JSON item, comparing it with the live tree,
checking the arrays read back, and writing everything into the live tree all-or-nothing.
It runs past 500 lines because these are one concept, the format, whose save side and
check side must change together (a new key in the JSON item is written, checksummed
and validated here).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from looproto import backends
from looproto.backends.base import SupportsIteratorState, SupportsStateJSON, Unsaveable
from looproto.errors import CheckpointError, value_repr
from looproto.module import (
    TreeVariable,
    assign_variable,
    is_variable,
    variable_to_numpy,
    variables_by_path,
)

_log = logging.getLogger("looproto")

FORMAT = "looproto.checkpoint"
# Version 2 requires the JSON item's own CRC-32 (`crc32`). Version 1 items (written by
# looproto 0.1 before it) are still read; some have no `crc32`, and are then read
# unverified with a warning.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Checkpoints already warned about (a directory is checked again at every prune).
_WARNED_UNVERIFIED: set[str] = set()
# The marker of bytes inside object states (a grain iterator's). A framework's values
# (the tensors of a torch data loader's sampler state) have their backend's tags.
_BYTES_KEY = "__looproto_bytes__"
# A variable of the tree inside an object's state (the variables a Keras optimizer was
# built for), stored as its path and restored as the live variable at that path.
_VARIABLE_KEY = "__looproto_variable__"
# Dtype kinds orbax/tensorstore cannot store: objects, strings, bytes.
UNSUPPORTED_KINDS = frozenset("OUS")


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is unreadable or fails its integrity checks."""


# ----------------------------------------------------------------------------
# What is saved


def is_generator(obj: Any) -> bool:
    return isinstance(obj, np.random.Generator)


def state_adapter(obj: Any) -> Any:
    """What saves `obj`'s position: its backend's adapter, or `obj` itself, or None.

    A framework's objects are adapted by their backend first
    (`looproto.backends.SupportsIteratorState`: `tf.data` iterators, torchdata's
    loaders), since a framework object with `get_state()` (a `torch.Generator`) may
    return framework values; then any object following the iterator-state protocol
    (callable `get_state()` and `set_state(state)`), such as grain's iterators and
    `looproto.data.ArrayIterator`. None when `obj` has no position to save.
    """
    if isinstance(obj, type):
        return None
    for backend in backends.for_object(obj):
        if isinstance(backend, SupportsIteratorState):
            adapter = backend.iterator_state(obj)
            if adapter is not None:
                return adapter
    if callable(getattr(obj, "get_state", None)) and callable(getattr(obj, "set_state", None)):
        return obj
    return None


def is_stateful(obj: Any) -> bool:
    return isinstance(obj, Unsaveable) or is_generator(obj) or state_adapter(obj) is not None


def to_json(value: Any, where: str, refs: Mapping[int, str] | None = None) -> Any:
    """`value` with NumPy scalars/arrays and tuples turned into JSON types.

    With `refs` (variable id -> path), a variable of the tree becomes a reference to
    its path.

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
    if refs is not None and is_variable(value):
        path = refs.get(id(value))
        if path is None:
            raise CheckpointError(
                f"The state of {where!r} refers to the variable "
                f"{getattr(value, 'name', value_repr(value))!r}, which the checkpoint's root "
                "does not reach: hold the model it belongs to in the checkpointed tree."
            )
        return {_VARIABLE_KEY: path}
    for backend in backends.for_object(value):
        if isinstance(backend, SupportsStateJSON):
            tagged = backend.state_to_json(value)
            if tagged is not None:
                tag, payload = tagged
                return {tag: payload}
    if isinstance(value, (list, tuple)):
        return [to_json(item, where, refs) for item in value]
    if isinstance(value, dict):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(
                    f"The state of {where!r} has a dict key {key!r} of type "
                    f"{type(key).__name__}; expected string keys (JSON objects)."
                )
            converted[key] = to_json(item, where, refs)
        return converted
    raise CheckpointError(
        f"The state of {where!r} holds {value_repr(value)} of type {type(value).__name__}; "
        "expected JSON data (None, bool, int, float, str, lists, dicts with string keys, "
        "NumPy scalars or arrays, bytes, a framework's tensors)."
    )


def from_json(value: Any, where: str, live: Mapping[str, Any] | None = None) -> Any:
    """Undoes `to_json`'s markers: bytes, framework values, variables (from `live`)."""
    if isinstance(value, list):
        return [from_json(item, where, live) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _BYTES_KEY in value:
        return base64.b64decode(value[_BYTES_KEY])
    if len(value) == 1 and _VARIABLE_KEY in value:
        path = value[_VARIABLE_KEY]
        if live is None or path not in live:
            raise CheckpointError(
                f"The state of {where!r} refers to the variable {path!r}, which the live "
                "tree does not have."
            )
        return live[path]
    if len(value) == 1:
        (tag,) = value
        owner = backends.json_tag_owner(tag)
        if owner is not None:
            backend = backends.get(owner)
            if not isinstance(backend, SupportsStateJSON):
                raise CheckpointError(
                    f"The state of {where!r} holds a value tagged {tag!r}, but the "
                    f"`{owner}` backend cannot read it back (no `state_from_json`)."
                )
            return backend.state_from_json(tag, value[tag])
    return {key: from_json(item, where, live) for key, item in value.items()}


def array_crc32(array: np.ndarray[Any, Any]) -> int:
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


def checkpoint_variables(root: Any) -> dict[str, Any]:
    """`variables_by_path(root)` with each `TreeVariable` split into its leaves.

    A leaf (a `TreeLeaf`, read and written as a variable is) is keyed by the variable's
    path and the leaf's (`"opt_state/0/mu/w"`).
    """
    found: dict[str, Any] = {}
    for path, variable in variables_by_path(root).items():
        if isinstance(variable, TreeVariable):
            for leaf_path, leaf in variable.leaves().items():
                found[f"{path}/{leaf_path}"] = leaf
        else:
            found[path] = variable
    return found


# ----------------------------------------------------------------------------
# Saving


def collect(root: Any, step: int) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
    """Host copies of all arrays reachable from `root`, and the JSON item describing them.

    Raises:
        CheckpointError: A variable has a dtype checkpoints cannot store, a state is not
            JSON data, or a leaf is `Unsaveable` (each names the path).
    """
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    tree: dict[str, Any] = {}
    variables = checkpoint_variables(root)
    for path, variable in variables.items():
        try:
            array = np.asarray(variable_to_numpy(variable))
        except Exception as err:
            raise CheckpointError(
                f"Cannot save {path!r}: reading it failed ({type(err).__name__}: {err})."
            ) from err
        if array.dtype.kind in UNSUPPORTED_KINDS:
            raise CheckpointError(
                f"Variable {path!r} has dtype {array.dtype}, which checkpoints cannot "
                "store; expected a numeric or bool dtype."
            )
        arrays[path] = array
        tree[path] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "crc32": array_crc32(array),
        }
    refs = {id(variable): path for path, variable in variables.items()}
    objects: dict[str, Any] = {}
    for path, obj in variables_by_path(root, predicate=is_stateful).items():
        if is_generator(obj):
            state = to_json(obj.bit_generator.state, path)
            objects[path] = {"kind": "numpy_generator", "state": state}
        else:
            state = to_json(read_state(obj, path, "save"), path, refs)
            objects[path] = {"kind": "state", "state": state}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "tree": tree,
        "objects": objects,
    }
    try:
        # The JSON item's own checksum: a flipped digit in a shape or an iterator
        # position would otherwise restore silently.
        meta["crc32"] = json_crc32(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {step}: state is not JSON data: {err}") from err
    return arrays, meta


def non_finite(arrays: dict[str, np.ndarray[Any, Any]]) -> list[tuple[str, int, int]]:
    """`(path, NaN/inf count, size)` of each floating-point array that is not all finite."""
    bad = []
    for path, array in arrays.items():
        if array.dtype.kind in "fc":
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            if count:
                bad.append((path, count, int(array.size)))
    return bad


def read_state(obj: Any, path: str, action: str) -> Any:
    """The state of the live object `obj` at `path`; raises, naming it, if it has none.

    Raises:
        CheckpointError: `obj` is `Unsaveable`, or its `get_state()` raised.
    """
    if isinstance(obj, Unsaveable):
        raise CheckpointError(f"Cannot {action} {path!r}: {obj.reason}")
    try:
        return _get_object_state(obj)
    except Exception as err:
        raise CheckpointError(
            f"Cannot {action} {path!r}: reading its state raised {type(err).__name__}: {err}"
        ) from err


# ----------------------------------------------------------------------------
# Restore checks


def json_crc32(meta: dict[str, Any]) -> int:
    """CRC-32 of the canonical JSON of everything in `meta` but its own checksum."""
    body = {key: value for key, value in meta.items() if key != "crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return zlib.crc32(text.encode("utf-8"))


def parse_meta(meta: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The array tree and object states of a JSON item, validated."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"Checkpoint {where} has no valid looproto metadata item; received {value_repr(meta)}."
        )
    # The checksum first: a damaged version digit is damage, not a newer format.
    if "crc32" in meta and meta["crc32"] != json_crc32(meta):
        raise CorruptCheckpointError(
            f"Checkpoint {where} has a damaged metadata item: its CRC-32 does not match "
            f"the recorded {value_repr(meta['crc32'])}."
        )
    version = meta.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"Checkpoint {where} has format version {version!r}; this looproto reads versions "
            f"{list(READABLE_VERSIONS)}. Upgrade looproto to read it."
        )
    if "crc32" not in meta:
        if version >= 2:
            raise CorruptCheckpointError(
                f"Checkpoint {where} has a damaged metadata item: it has no `crc32` key, "
                f"which format version {version} requires."
            )
        if where not in _WARNED_UNVERIFIED:
            _WARNED_UNVERIFIED.add(where)
            _log.warning(
                "Checkpoint %s is in format version 1 without a CRC-32 of its metadata "
                "item (written by an older looproto): its shapes and object states are "
                "read unverified. Checkpoints saved from now on carry one.",
                where,
            )
    tree = meta.get("tree")
    objects = meta.get("objects")
    if not isinstance(tree, dict) or not isinstance(objects, dict):
        raise CorruptCheckpointError(f"Checkpoint {where} has a malformed metadata item.")
    for path, spec in tree.items():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("shape"), list)
            and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("crc32"), int)
        ):
            raise CorruptCheckpointError(
                f"Checkpoint {where} has a malformed entry for {path!r}: {value_repr(spec)}."
            )
    for path, entry in objects.items():
        if not (isinstance(entry, dict) and "state" in entry and "kind" in entry):
            raise CorruptCheckpointError(
                f"Checkpoint {where} has a malformed state for {path!r}: {value_repr(entry)}."
            )
    return tree, objects


def allowed(path: str, patterns: Sequence[str]) -> bool:
    """Whether `path` matches one of the `allow_missing` glob patterns."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def check_matches(
    tree: dict[str, Any],
    objects: dict[str, Any],
    variables: dict[str, Any],
    live_objects: dict[str, Any],
    where: str,
    allow_missing: Sequence[str] = (),
) -> None:
    """Raises `CheckpointError` listing every path where checkpoint and live tree differ.

    Live paths the checkpoint lacks are let be when they match `allow_missing`.
    """
    problems: list[str] = []
    missing: list[str] = []
    for path in sorted(set(variables) - set(tree)):
        if allowed(path, allow_missing):
            continue
        shape, dtype = _live_spec(variables[path])
        missing.append(path)
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
        if allowed(path, allow_missing):
            continue
        missing.append(path)
        problems.append(f"  {path!r}: object state not in the checkpoint")
    for path in sorted(set(objects) - set(live_objects)):
        problems.append(f"  {path!r}: object state in the checkpoint but no live object")
    for path in sorted(set(objects) & set(live_objects)):
        live_kind = "numpy_generator" if is_generator(live_objects[path]) else "state"
        if objects[path]["kind"] != live_kind:
            problems.append(
                f"  {path!r}: checkpoint holds a {objects[path]['kind']!r} state, live object "
                f"is a {live_kind!r}"
            )
    if problems:
        hint = ""
        if missing:
            hint = (
                "\nState the live tree has and the checkpoint lacks was probably captured only "
                "after the checkpoint was written (by an older looproto or older code). To "
                "restore everything else and keep the live, freshly built values of these "
                "paths, pass them (or glob patterns) as `allow_missing`: "
                f"`CheckpointManager(..., allow_missing={missing!r})` or "
                "`manager.restore(step, allow_missing=[...])`. The resumed run is then not "
                "exact for that state."
            )
        raise CheckpointError(
            f"Checkpoint {where} does not match the variables of `checkpoint` "
            f"({len(problems)} difference(s)); nothing was restored:\n" + "\n".join(problems) + hint
        )


def _set_object_state(
    obj: Any, state: Any, path: str | None = None, live: Mapping[str, Any] | None = None
) -> None:
    """Sets `state`; from a checkpoint's JSON (`path` given) it is decoded first."""
    if is_generator(obj):
        obj.bit_generator.state = state
    else:
        state_adapter(obj).set_state(state if path is None else from_json(state, path, live))


def _get_object_state(obj: Any) -> Any:
    return obj.bit_generator.state if is_generator(obj) else state_adapter(obj).get_state()


def write_all(
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
    put back. A live variable that `arrays` lacks (let be by `allow_missing`) is
    written its own live value, so that state a framework object assembles from several
    variables (a torch optimizer's per-parameter state) is still committed whole; a live
    object that `objects` lacks keeps its state.

    Raises:
        CheckpointError: A write failed; the path and the reason are named.
    """
    written_objects: list[tuple[Any, Any]] = []
    written_variables: list[tuple[Any, Any]] = []
    current, rejected = "", ""
    try:
        for path, obj in live_objects.items():
            if path not in objects:
                continue
            current = path
            rejected = (
                f"; the live object at {path!r} ({type(obj).__name__}) rejected its saved "
                "state (was its type changed?)"
            )
            previous = _get_object_state(obj)
            _set_object_state(obj, objects[path]["state"], path, variables)
            written_objects.append((obj, previous))
        rejected = ""
        for path, variable in variables.items():
            current = path
            previous = variable_to_numpy(variable)
            assign_variable(variable, arrays.get(path, previous))
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


def check_arrays(arrays: dict[str, Any], tree: dict[str, Any], where: str) -> None:
    """Raises `CorruptCheckpointError` unless `arrays` are exactly what `tree` records."""
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
        crc = array_crc32(array)
        if crc != spec["crc32"]:
            problems.append(f"  {path!r}: CRC-32 {crc} does not match the recorded {spec['crc32']}")
    if problems:
        raise CorruptCheckpointError(
            f"Checkpoint {where} is corrupted ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
