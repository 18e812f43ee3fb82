"""An exclusive lock on an output folder, so that two builds or ingests never interleave there.

The lock is an ``fcntl`` lock on ``<folder>/.lock``, which also names its holder (pid, host,
since when). The operating system drops it when the holder exits, crashed or not, so
a stale file never blocks a rerun. Locks are re-entrant within one process (an ingest holds its
folder while its shard writer takes the same lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # real path -> [file descriptor, depth] held by this process


class FolderLockedError(ConfigError):
    """Another process is writing the folder; the message names it."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "another process (its details are unreadable)"


def acquire(folder: str | Path) -> None:
    """Take the lock on ``folder`` (created if missing) or raise :class:`FolderLockedError`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(f"{folder} is being written by {_holder(path)}; wait for it to "
                                    "finish or write elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and lock: try again
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    _held[key] = [fd, 1]


def release(folder: str | Path) -> None:
    """Drop one hold of the lock on ``folder``; the last one removes the lock file."""
    path = Path(folder) / LOCK_NAME
    key = os.path.realpath(path)
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] > 0:
        return
    fd, _ = _held.pop(key)
    path.unlink(missing_ok=True)
    os.close(fd)
