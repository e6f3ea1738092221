"""Private: reads TensorBoard event files back, for tests (re-exported by `looproto.testing`).

Event files are TFRecord files: each record is `uint64 length`, `uint32 masked
crc32c(length)`, `length` bytes of a serialized `Event` proto, `uint32 masked
crc32c(data)`, all little-endian. The protos are parsed with tensorboardX's
copies (`tensorboardX.proto`), imported on first use.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

__all__ = ["read_events"]

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def _masked_crc(data: bytes) -> int:
    """Returns TFRecord's masked CRC32C of `data`."""
    from tensorboardX.crc32c import crc32c

    crc = int(crc32c(data)) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str) -> Iterator[bytes]:
    """Yields the data of every complete record of the TFRecord file `path`.

    A truncated final record (a crash mid-write) is skipped; a corrupt record
    before the end raises `ValueError`.
    """
    with open(path, "rb") as file:
        blob = file.read()
    offset, end = 0, len(blob)
    while offset < end:
        if end - offset < _HEADER.size:
            return  # truncated header
        length, length_crc = _HEADER.unpack_from(blob, offset)
        data_start = offset + _HEADER.size
        data_end = data_start + length
        last = data_end + _FOOTER.size >= end
        if data_end + _FOOTER.size > end:
            return  # truncated data or footer
        if _masked_crc(blob[offset : offset + 8]) != length_crc:
            if last:
                return
            raise ValueError(f"Corrupt record length in event file {path!r} at byte {offset}.")
        data = blob[data_start:data_end]
        (data_crc,) = _FOOTER.unpack_from(blob, data_end)
        if _masked_crc(data) != data_crc:
            if last:
                return
            raise ValueError(f"Corrupt record data in event file {path!r} at byte {offset}.")
        yield data
        offset = data_end + _FOOTER.size


def _decode_value(value: Any) -> Any:
    """Returns a `Summary.Value` as a float (scalar), a dict (histogram) or the proto."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "histo":
        histo = value.histo
        return {
            "min": histo.min,
            "max": histo.max,
            "num": histo.num,
            "sum": histo.sum,
            "sum_squares": histo.sum_squares,
            "bucket_limit": list(histo.bucket_limit),
            "bucket": list(histo.bucket),
        }
    if kind == "tensor":
        import numpy as np

        tensor = value.tensor
        for field in ("float_val", "double_val", "int_val", "int64_val"):
            values = getattr(tensor, field)
            if len(values) == 1:
                return float(values[0])
        if tensor.tensor_content and tensor.dtype in (1, 2):  # DT_FLOAT, DT_DOUBLE
            array = np.frombuffer(tensor.tensor_content, "<f4" if tensor.dtype == 1 else "<f8")
            if array.size == 1:
                return float(array[0])
    return value


def read_events(logdir: str | os.PathLike[str]) -> dict[str, dict[str, list[tuple[int, Any]]]]:
    """Reads every TensorBoard event file under `logdir`.

    Args:
        logdir: A directory; it and all its sub-directories are searched for
            `events.out.tfevents.*` files.

    Returns:
        `{run: {tag: [(step, value), ...]}}`, where `run` is the directory of the
        event file relative to `logdir` (`"."` for `logdir` itself, `/`-separated)
        and the values of a tag are in file-name order, then write order. Scalars
        are floats, histograms dicts with keys `min`, `max`, `num`, `sum`,
        `sum_squares`, `bucket_limit` and `bucket`; other summaries are returned
        as their `Summary.Value` proto. Events without a summary (file version,
        session logs) are left out, and no purging is applied.

    Raises:
        ValueError: If a record before the end of a file is corrupt. A truncated
            last record, as a crash mid-write leaves, is skipped.
    """
    from tensorboardX.proto.event_pb2 import Event

    root = os.fspath(logdir)
    runs: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        names = sorted(name for name in files if name.startswith("events.out.tfevents."))
        if not names:
            continue
        run = os.path.relpath(directory, root).replace(os.sep, "/")
        tags = runs.setdefault(run, {})
        for name in names:
            for record in _records(os.path.join(directory, name)):
                event = Event.FromString(record)
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    tags.setdefault(value.tag, []).append((event.step, _decode_value(value)))
    return runs
