"""One training at a time per workspace: an exclusive lock on a file in it (fcntl), held for
the whole pipeline run. It works for every front door at once: `make run`, the scheduled
deployment, a second trigger, a user's `dvc repro` wrapped by the flow. The file names the
holder (pid and since when), so a run that waits can say for whom."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOCK_FILE = ".finetune.lock"
POLL_S = 0.5


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


def holder(handle: TextIO) -> str:
    """Who holds the lock, as its file says: ``pid N since <time>``."""
    handle.seek(0)
    pid, _, since = handle.read().strip().partition(" ")
    return f"pid {pid or '?'}" + (f" since {since}" if since else "")


def acquire(handle: TextIO, workspace: Path, wait: bool, timeout_s: float | None,
            say: Callable[[str], object]) -> None:
    """Lock ``handle``; ``wait``: poll until it is free (saying once whom it waits for) or
    ``timeout_s`` has passed (None: no limit), else raise WorkspaceBusy at once."""
    started = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if not wait or (timeout_s is not None and waited >= timeout_s):
            after = f" after waiting {waited:.0f} s (retrain.wait_timeout_s: {timeout_s})" if wait else ""
            raise WorkspaceBusy(f"{workspace} is busy{after}: another pipeline run ({holder(handle)}) holds it")
        if not said:
            limit = "no limit" if timeout_s is None else f"at most {timeout_s:.0f} s, retrain.wait_timeout_s"
            say(f"waiting for {workspace}: another pipeline run ({holder(handle)}) holds it ({limit})")
            said = True
        time.sleep(POLL_S)


@contextmanager
def workspace_lock(workspace: Path, wait: bool, timeout_s: float | None = None,
                   say: Callable[[str], object] = print) -> Iterator[None]:
    """Hold the workspace's lock (see :func:`acquire` for ``wait``, ``timeout_s`` and ``say``)."""
    path = Path(workspace) / LOCK_FILE
    with path.open("a+") as handle:
        acquire(handle, Path(workspace), wait, timeout_s, say)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
