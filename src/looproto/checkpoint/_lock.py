"""Who owns a checkpoint directory: one writing process at a time, readers never write.

The owner holds `<directory>/.looproto-lock`, a small JSON file naming its host, its
process id, the process's start time (where the system tells it: a reused process id
is not mistaken for the owner) and a random token. It is created with `O_EXCL`, so of
two processes starting at once one gets it and the other fails at once with a line
naming the first.

A lock is *stale*, and the next process takes it over, when its owner is provably
gone: on this host, a process id that no longer runs (or now runs another program,
or is a zombie); on another host, a lock whose file has not been touched for
`EXPIRY_SECONDS` (a live owner touches it every `HEARTBEAT_SECONDS` from a daemon
thread). A lock file that cannot be parsed (a crash between creating and writing it)
is stale once it is `EXPIRY_SECONDS` old. A takeover replaces the file atomically
and then reads it back; the owner checks that the file still holds its token before
every save (`verify`), so a takeover race costs the loser its first save, never a
checkpoint.

Managers in one process share the lock of a directory (a count of holders): the
process is the owner, whichever of its managers writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, ClassVar

from looproto.errors import CheckpointStorageError

__all__ = ["EXPIRY_SECONDS", "HEARTBEAT_SECONDS", "LOCK_NAME", "DirectoryLock", "describe_owner"]

_log = logging.getLogger("looproto")

LOCK_NAME = ".looproto-lock"
HEARTBEAT_SECONDS = 30.0
EXPIRY_SECONDS = 300.0


def _proc_stat(pid: int) -> list[str]:
    """The fields of `/proc/<pid>/stat` after the command name (Linux); [] if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return []


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot, or None if unknown."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5)


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether `pid` runs on this host and is the process that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    state = _proc_stat(pid)[:1]
    if state in (["Z"], ["X"]):  # killed, not yet reaped by its parent
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


def describe_owner(record: dict[str, Any]) -> str:
    """`host:pid` and since when, for messages."""
    since = record.get("since")
    when = (
        time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, (int, float))
        else ""
    )
    return f"process {record.get('pid')} on host {record.get('host')!r}{when}"


class DirectoryLock:
    """The lock of one checkpoint directory (see the module docstring)."""

    # This process's locks by real path, with how many managers share each.
    _held: ClassVar[dict[str, tuple[DirectoryLock, int]]] = {}
    _held_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.record: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "token": uuid.uuid4().hex,
            "since": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ sharing

    @classmethod
    def acquire_shared(cls, directory: str) -> DirectoryLock:
        """The process's lock of `directory`, taken now if no manager here holds it."""
        key = os.path.realpath(directory)
        with cls._held_guard:
            held = cls._held.get(key)
            if held is not None and held[0].record["pid"] == os.getpid():
                cls._held[key] = (held[0], held[1] + 1)
                return held[0]
            lock = cls(directory)
            lock._acquire()
            cls._held[key] = (lock, 1)
            return lock

    def release_shared(self) -> None:
        """Drops one holder; the last one removes the lock file."""
        key = os.path.realpath(self.directory)
        with self._held_guard:
            held = self._held.get(key)
            if held is None or held[0] is not self:
                return
            if held[1] > 1:
                self._held[key] = (self, held[1] - 1)
                return
            del self._held[key]
        self._release()

    # ------------------------------------------------------------------ taking

    def _acquire(self) -> None:
        for _ in range(30):
            if self._create():
                self._start_heartbeat()
                return
            owner, raw, age = self._read()
            if raw is None:
                continue  # released between the two calls: try again
            reason = self._stale_reason(owner, age)
            if reason is None:
                if owner is None:  # being written by a process starting right now?
                    time.sleep(0.1)
                    continue
                raise CheckpointStorageError(
                    f"The checkpoint directory {self.directory} is in use by "
                    f"{describe_owner(owner)} (its lock is {self.path}); one process at a "
                    "time writes a directory. Stop that run, or give this one another "
                    "directory (read-only users: `CheckpointManager(..., read_only=True)`)."
                )
            if self._take_over(raw):
                _log.warning(
                    "Took over the checkpoint directory %s from %s: %s.",
                    self.directory,
                    "an unreadable lock" if owner is None else describe_owner(owner),
                    reason,
                )
                self._start_heartbeat()
                return
        raise CheckpointStorageError(
            f"The lock {self.path} of the checkpoint directory is unreadable, or keeps "
            "changing hands; it is taken over once it is "
            f"{EXPIRY_SECONDS:.0f} s old (remove it if no process uses the directory)."
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise CheckpointStorageError(
                f"Cannot write in the checkpoint directory {self.directory}: "
                f"{err.strerror or err} (creating {LOCK_NAME})."
            ) from err
        try:
            os.write(fd, json.dumps(self.record).encode())
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise CheckpointStorageError(
                f"Cannot write in the checkpoint directory {self.directory}: "
                f"{err.strerror or err} (writing {LOCK_NAME})."
            ) from err
        os.close(fd)
        return True

    def _read(self) -> tuple[dict[str, Any] | None, bytes | None, float]:
        """The owner record (None if unparsable), the raw bytes (None if gone), its age."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, None, 0.0
        except OSError as err:
            raise CheckpointStorageError(
                f"Cannot read the lock {self.path}: {err.strerror or err}."
            ) from err
        try:
            record = json.loads(raw)
        except ValueError:
            return None, raw, age
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
            return None, raw, age
        return record, raw, age

    def _stale_reason(self, owner: dict[str, Any] | None, age: float) -> str | None:
        if owner is None:
            if age > EXPIRY_SECONDS:  # not a process writing it right now
                return f"the lock file is unreadable and {age:.0f} s old"
            return None
        if owner.get("host") == self.record["host"]:
            if owner["pid"] == os.getpid() and owner.get("token") != self.record["token"]:
                # This very process took it and lost track of it (a manager never
                # closed, then garbage-collected): it is not running a save elsewhere.
                return "it was taken earlier by this same process"
            if not _pid_alive(owner["pid"], owner.get("start")):
                return "that process is no longer running"
            return None
        if age > EXPIRY_SECONDS:
            return (
                f"the lock was last refreshed {age:.0f} s ago, more than the "
                f"{EXPIRY_SECONDS:.0f} s after which another host's lock expires"
            )
        return None

    def _take_over(self, stale: bytes) -> bool:
        """Replaces the stale lock (if it is still the one judged) with ours."""
        temporary = f"{self.path}.{self.record['token']}"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
                f.flush()
                os.fsync(f.fileno())
            _, raw, _ = self._read()
            if raw != stale:  # someone else changed it meanwhile: judge again
                return False
            os.replace(temporary, self.path)
        except OSError as err:
            raise CheckpointStorageError(
                f"Cannot replace the stale lock {self.path}: {err.strerror or err}."
            ) from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        owner, _, _ = self._read()
        return owner is not None and owner.get("token") == self.record["token"]

    # ------------------------------------------------------------------ holding

    def verify(self) -> None:
        """Raises `CheckpointStorageError` unless the lock file still names this holder."""
        owner, raw, _ = self._read()
        if owner is not None and owner.get("token") == self.record["token"]:
            return
        if raw is None:
            lost = "its lock file was removed"
        elif owner is None:
            lost = "its lock file was overwritten with something unreadable"
        else:
            lost = f"{describe_owner(owner)} took it over"
        raise CheckpointStorageError(
            f"This process no longer owns the checkpoint directory {self.directory}: "
            f"{lost}. Nothing was written; two processes must not write one directory."
        )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(
            target=self._beat, name=f"looproto-lock {self.directory}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            owner, _, _ = self._read_quietly()
            if owner is None or owner.get("token") != self.record["token"]:
                return  # not ours any more: `verify` reports it at the next save
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _read_quietly(self) -> tuple[dict[str, Any] | None, bytes | None, float]:
        try:
            return self._read()
        except CheckpointStorageError:
            return None, None, 0.0

    def _release(self) -> None:
        self._stop.set()
        owner, _, _ = self._read_quietly()
        if owner is not None and owner.get("token") == self.record["token"]:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
