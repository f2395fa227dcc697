"""Exclusive locks on a file (fcntl) that name their holder.

The locked file says ``<pid> <since>``, so a process that finds it locked can say by whom and
since when (:class:`Holder`). One mechanism for every lock of the project: the workspace's (one
pipeline run at a time, flows/lock.py) and a training folder's (one trainer per folder,
finetune/core/guard.py). The kernel releases a lock when its holder dies, even by ``kill -9``:
a stale file never blocks anyone.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

POLL_S = 0.5  # how often a waiting process tries again


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says; None where the file does not say (yet)."""

    pid: str | None
    since: str | None

    def __str__(self) -> str:
        """``pid N since <time>``; ``pid ?`` when the file does not name one yet."""
        return f"pid {self.pid or '?'}" + (f" since {self.since}" if self.since else "")


class LockBusy(Exception):
    """Another process holds the lock (``holder``); waiting was not asked for or ran out after ``waited_s``."""

    def __init__(self, path: Path, holder: Holder, waited_s: float):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder, self.waited_s = path, holder, waited_s


def holder(handle: TextIO) -> Holder:
    """Who holds the lock of ``handle``'s file, as the file says."""
    handle.seek(0)
    pid, _, since = handle.read().strip().partition(" ")
    return Holder(pid or None, since or None)


def acquire(path: Path, wait_s: float | None = 0.0,
            on_wait: Callable[[Holder], object] = lambda holder: None) -> TextIO:
    """An open handle on ``path`` (created if missing), exclusively locked, with this process named in it.

    When another process holds it: try again every :data:`POLL_S` for at most ``wait_s``
    seconds (None: no limit; 0: not at all), calling ``on_wait`` once with the holder, then
    raise :class:`LockBusy`."""
    path = Path(path)
    started = time.monotonic()
    told = False
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(handle)
            handle.close()
            waited = time.monotonic() - started
            if wait_s is not None and waited >= wait_s:
                raise LockBusy(path, who, waited) from None
            if not told:
                on_wait(who)
                told = True
            time.sleep(POLL_S)
            continue
        if _is_current(path, handle):
            _name_self(handle)
            return handle
        handle.close()  # its last holder removed it between our open and lock: lock the new one


def release(handle: TextIO, path: Path, remove: bool = False) -> None:
    """Unlock and close ``handle``; ``remove``: delete ``path`` first (still locked, so nobody else
    holds it), for a lock file that must not outlive the work it guards."""
    if remove:
        Path(path).unlink(missing_ok=True)
    handle.close()  # closing the last descriptor releases the flock


def _is_current(path: Path, handle: TextIO) -> bool:
    """Whether ``handle`` is the file at ``path`` now (not one removed since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _name_self(handle: TextIO) -> None:
    """Write this process and the time into the locked file, for whoever finds it locked."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    handle.flush()
