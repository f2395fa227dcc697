"""One training at a time per workspace: an exclusive lock on a file in it (fcntl), held for
the whole pipeline run. It works for every front door at once: `make run`, the scheduled
deployment, a second trigger, a user's `dvc repro` wrapped by the flow."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".finetune.lock"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


@contextmanager
def workspace_lock(workspace: Path, wait: bool) -> Iterator[None]:
    """Hold the workspace's lock; ``wait``: until it is free, else raise WorkspaceBusy at once."""
    path = Path(workspace) / LOCK_FILE
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise WorkspaceBusy(f"{workspace} is busy: another pipeline run (pid {handle.read().strip() or '?'}) "
                                "holds it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
