"""One train.py per workdir. Two runs on one workdir would save, and orbax would delete, each other's
checkpoints; the lock makes the second one stop with a line naming the first.

`<workdir>/train.lock` is held with `flock` for as long as the run lives, so the kernel releases it when the
process ends in any way (kill -9 included): a lock is never left held by a dead process. The file records
who holds it (pid, host, start time); a run that takes the lock and finds another process's record there
says that it reclaimed the lock of a run that stopped without releasing it. The file is emptied, never
deleted, on release (deleting it would let two runs lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from koala_jax.errors import ConfigError

LOCK_NAME = "train.lock"


class WorkdirLock:
    """The workdir lock of this process (take it with `acquire`, give it back with `release`)."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Path(workdir).absolute() / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, report: Callable[[str], None]) -> None:
        """Take the lock or raise ConfigError naming the run that holds it; `report` says when the lock of a
        run that died was reclaimed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by another train.py (process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): two runs on one workdir would "
                f"overwrite each other's checkpoints; wait for it, stop it, or use another workdir"
            ) from e
        previous = _read(fd)
        if previous.get("pid") not in (None, os.getpid()):
            report(
                f"reclaimed {self.path}: process {previous['pid']} on {previous.get('host', '?')} (started "
                f"{previous.get('started', '?')}) stopped without releasing it"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    """The holder's record in the lock file (empty when there is none, or it is unreadable)."""
    raw = os.pread(fd, 4096, 0)
    try:
        record = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
