"""Exclusive locks on run and bench directories: one writer per directory, or a clear error.

Two trainers writing into one run directory interleave their logs and checkpoints into a
run that is neither; two benches into one ``--out`` delete each other's cells. Every
command that writes a directory takes ``DirectoryLock(directory)`` first.

The lock is an OS file lock (``flock``, through the ``filelock`` package) on
``<directory>/.modalmoe.lock``. The kernel releases it when its process dies, however it
dies (SIGKILL, OOM, power loss on a local disk), so a lock left by a killed process is
never in the way: the next command takes it over without asking. The holder's pid, host
and command go into ``.modalmoe.lock.owner`` so that the error can say who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from modalmoe.io import atomic_write_text

LOCK_NAME = ".modalmoe.lock"


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock; the message names it."""


class DirectoryLock:
    """Hold ``directory``'s exclusive lock while the ``with`` block runs.

    Args:
        directory: created when missing.
        what: how the error names the directory ("run directory", "bench directory").

    Raises:
        DirectoryInUse: on entering, when another process holds it (no waiting).
    """

    def __init__(self, directory: str | os.PathLike, *, what: str = "directory") -> None:
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self.owner_path = self.directory / (LOCK_NAME + ".owner")
        self._lock: FileLock | None = None

    def __enter__(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise DirectoryInUse(
                f"{str(self.directory)!r} is in use by {self._holder()}: a {self.what} takes one writer at a time; "
                "wait for it to finish (or stop it), or choose another --out"
            ) from None
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        atomic_write_text(self.owner_path, json.dumps(owner))
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _holder(self) -> str:
        try:
            owner = json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return "another process"  # it has the lock but has not written its name yet
        command = " ".join(str(a) for a in owner.get("command", []))[:120]
        return f"pid {owner.get('pid')} on {owner.get('host')}" + (f" ({command})" if command else "")
