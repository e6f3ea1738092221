"""One checkpoint directory, many processes: one owner writes, readers change nothing.

The owner's lock (`checkpoint/_lock.py`): a second writer fails at once naming the
first; a dead owner's lock (a SIGKILLed process, another host's expired lock, an
unreadable file) is taken over; a lost lock stops the next save. Readers
(`read_only=True`, `read_metadata`, `checkpoints_iterator`) never take the lock nor
remove, rename or create anything, and tolerate steps the owner deletes meanwhile.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from looproto.checkpoint import CheckpointManager, _lock, checkpoints_iterator, read_metadata
from looproto.errors import CheckpointError, CheckpointStorageError, StorageError
from looproto.module import Variable

LOCK = ".looproto-lock"

# A manager in another process, holding the directory until told to stop (stdin).
_HOLDER = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import numpy as np
    from looproto.checkpoint import CheckpointManager
    from looproto.module import Variable
    manager = CheckpointManager(sys.argv[1], {"w": Variable(np.zeros(3, np.float32))})
    print("holding", flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.readline()
        manager.close()
    else:
        manager.save(checkpoint_number=1)
        # A save under way when the process dies: orbax's temporary directory.
        pathlib.Path(sys.argv[1], "7.orbax-checkpoint-tmp").mkdir()
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def holder(directory: Path, mode: str = "wait") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding", proc.communicate()[1][-2000:]
    return proc


def root() -> dict[str, Any]:
    return {"w": Variable(np.arange(3, dtype=np.float32))}


def write_lock(directory: Path, age: float = 0.0, **record: Any) -> None:
    path = directory / LOCK
    path.write_text(json.dumps(record))
    when = time.time() - age
    os.utime(path, (when, when))


# ----------------------------------------------------------------------------
# The owner's lock


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    first = holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointStorageError) as info:
            CheckpointManager(tmp_path, root())
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert "\n" not in message
        assert f"is in use by process {first.pid} on host {socket.gethostname()!r}" in message
        assert isinstance(info.value, StorageError) and isinstance(info.value, CheckpointError)
        # A reader is welcome meanwhile.
        with CheckpointManager(tmp_path, root(), read_only=True) as reader:
            assert reader.restore_or_initialize() is None
    finally:
        assert first.stdin is not None
        first.stdin.write("\n")
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert not (tmp_path / LOCK).exists()  # released on close
    with CheckpointManager(tmp_path, root()) as manager:
        assert manager.save(checkpoint_number=1) is not None


def test_a_killed_owners_lock_and_unfinished_save_go_to_the_next_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = holder(tmp_path, "save-then-die")
    dead.communicate(timeout=60)
    assert dead.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == dead.pid
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, root()) as manager:
        assert f"Took over the checkpoint directory {tmp_path}" in caplog.text
        assert "that process is no longer running" in caplog.text
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        # The dead owner's unfinished save is removed: it can never be completed.
        assert sorted(os.listdir(tmp_path)) == [LOCK, "1"]
        assert manager.restore_or_initialize() == str(tmp_path / "1")


def test_another_hosts_lock_holds_until_it_expires(tmp_path: Path) -> None:
    record = {"host": "elsewhere", "pid": 1, "token": "x", "since": time.time() - 1000}
    write_lock(tmp_path, age=10, **record)
    with pytest.raises(CheckpointStorageError, match=r"in use by process 1 on host 'elsewhere'"):
        CheckpointManager(tmp_path, root())
    write_lock(tmp_path, age=_lock.EXPIRY_SECONDS + 5, **record)
    with CheckpointManager(tmp_path, root()):
        assert json.loads((tmp_path / LOCK).read_text())["host"] == socket.gethostname()


def test_a_lock_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    # The parent process is alive, but started at another time than the lock says.
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), start="1", token="x")
    if _lock._process_start(os.getppid()) in (None, "1"):
        pytest.skip("process start times are not known here")
    with CheckpointManager(tmp_path, root()):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_when_old(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text("{half a rec")
    with pytest.raises(CheckpointStorageError, match="unreadable"):
        CheckpointManager(tmp_path, root())
    old = time.time() - _lock.EXPIRY_SECONDS - 5
    os.utime(tmp_path / LOCK, (old, old))
    with CheckpointManager(tmp_path, root()):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_managers_of_one_process_share_the_lock_and_a_dropped_one_lets_go(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, root())
    second = CheckpointManager(tmp_path, root())
    first.close()
    assert (tmp_path / LOCK).exists()  # the second still holds it
    second.save(checkpoint_number=1)
    del second
    gc.collect()
    assert not (tmp_path / LOCK).exists()


def test_a_lost_lock_stops_the_next_save_before_anything_is_written(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, root()) as manager:
        manager.save(checkpoint_number=1)
        # Another live process on this host took the directory (say, after a clock
        # jump made the lock look expired to it).
        write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), token="theirs")
        with pytest.raises(CheckpointStorageError, match=r"no longer owns .* took it over"):
            manager.save(checkpoint_number=2)
        assert sorted(os.listdir(tmp_path)) == [LOCK, "1"]
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "theirs"  # left to them


def test_the_owner_refreshes_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lock, "HEARTBEAT_SECONDS", 0.05)
    with CheckpointManager(tmp_path, root()):
        old = time.time() - 100
        os.utime(tmp_path / LOCK, (old, old))
        deadline = time.monotonic() + 10
        while os.stat(tmp_path / LOCK).st_mtime < old + 50:
            assert time.monotonic() < deadline, "the lock was never refreshed"
            time.sleep(0.05)


@pytest.mark.parametrize("what", ["file", "dangling symlink"])
def test_a_file_or_dangling_link_as_the_directory_is_a_storage_error(
    tmp_path: Path, what: str
) -> None:
    target = tmp_path / "checkpoints"
    if what == "file":
        target.write_text("x")
        expected = r"is a file, not a directory"
    else:
        target.symlink_to(tmp_path / "gone")
        expected = r"is a dangling symbolic link"
    for read_only in (False, True):
        with pytest.raises(CheckpointStorageError, match=expected):
            CheckpointManager(target, root(), read_only=read_only)


def test_a_full_disk_during_a_save_is_a_storage_error_keeping_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: orbax's save raising what the OS says on a full disk (the real full
    # disk, on a small tmpfs, is in tests/test_fault_injection.py).
    with CheckpointManager(tmp_path, root(), max_to_keep=1) as manager:
        manager.save(checkpoint_number=1)
        for failure in (
            OSError(errno.ENOSPC, "No space left on device"),
            ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device"),
        ):

            def full(*args: Any, failure: Exception = failure, **kwargs: Any) -> Any:
                raise failure

            monkeypatch.setattr(manager._manager, "save", full)
            with pytest.raises(CheckpointStorageError, match=r"previous checkpoints are kept"):
                manager.save(checkpoint_number=2)
        assert manager.checkpoints == [str(tmp_path / "1")]


# ----------------------------------------------------------------------------
# Readers


def test_a_reader_changes_nothing_in_the_directory(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, root()) as owner:
        owner.save(checkpoint_number=1)
        owner.save(checkpoint_number=2)
        # What an owner in the middle of things has on disk: a save under way, a
        # deletion under way, and (below) a damaged newest step.
        (tmp_path / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
        (tmp_path / ".1.looproto-deleting").mkdir()
        (tmp_path / "2" / "meta" / "metadata").write_text("{garbled")
        before = sorted(os.listdir(tmp_path))
        lock = (tmp_path / LOCK).read_text()
        reader_root = root()
        reader_root["w"].assign(np.zeros(3, np.float32))
        with CheckpointManager(tmp_path, reader_root, read_only=True) as reader:
            # The damaged step is skipped, not set aside: the owner decides.
            assert reader.restore_or_initialize() == str(tmp_path / "1")
            with pytest.raises(CheckpointError, match="read-only"):
                reader.save(checkpoint_number=4)
        np.testing.assert_array_equal(reader_root["w"].numpy(), np.arange(3, dtype=np.float32))
        assert read_metadata(tmp_path, 1)["step"] == 1
        assert list(checkpoints_iterator(tmp_path, timeout=0)) == [str(tmp_path / "2")]
        assert sorted(os.listdir(tmp_path)) == before
        assert (tmp_path / LOCK).read_text() == lock


def test_a_reader_of_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "not-yet", root(), read_only=True) as reader:
        assert reader.restore_or_initialize() is None
    assert not (tmp_path / "not-yet").exists()


def test_readers_list_and_restore_while_the_owner_saves_and_prunes(tmp_path: Path) -> None:
    # The owner keeps one checkpoint and saves as fast as it can: every step a reader
    # lists is soon deleted, often while the reader is reading it.
    stop = threading.Event()
    owner_root = root()
    saved: list[int] = []

    def own() -> None:
        with CheckpointManager(tmp_path, owner_root, max_to_keep=1) as owner:
            step = 0
            while not stop.is_set():
                step += 1
                owner_root["w"].assign(np.full(3, step, np.float32))
                owner.save(checkpoint_number=step)
                saved.append(step)

    writer = threading.Thread(target=own)
    writer.start()
    try:
        while not saved:
            time.sleep(0.01)
        deadline = time.monotonic() + 3
        restored = []
        while time.monotonic() < deadline:
            reader_root = root()
            with CheckpointManager(tmp_path, reader_root, read_only=True) as reader:
                path = reader.restore_or_initialize()
            if path is not None:
                step = int(os.path.basename(path))
                # Restored whole, and from the step it names.
                np.testing.assert_array_equal(reader_root["w"].numpy(), np.full(3, step))
                restored.append(step)
            assert read_metadata(tmp_path)["step"] >= 1
    finally:
        stop.set()
        writer.join(timeout=60)
    assert len(saved) > 10 and len(restored) > 3, (len(saved), restored)
