"""One training at a time per workspace: an exclusive lock on a file in it (finetune/core/lock.py),
held for the whole pipeline run. It works for every front door at once: `make run`, the scheduled
deployment, a second trigger, a user's `dvc repro` wrapped by the flow. The file names the
holder (pid and since when), so a run that waits can say for whom."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.core.lock import LockBusy, acquire, release

LOCK_FILE = ".finetune.lock"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace."""


@contextmanager
def workspace_lock(workspace: Path, wait: bool, timeout_s: float | None = None,
                   say: Callable[[str], object] = print) -> Iterator[None]:
    """Hold the workspace's lock while the block runs. Held by another run: ``wait``: wait until
    it is free (saying once whom it waits for, through ``say``) or ``timeout_s`` has passed (None:
    no limit), else raise WorkspaceBusy at once."""
    workspace = Path(workspace)
    path = workspace / LOCK_FILE
    limit = "no limit" if timeout_s is None else f"at most {timeout_s:.0f} s, retrain.wait_timeout_s"
    try:
        handle = acquire(path, wait_s=timeout_s if wait else 0.0, on_wait=lambda holder: say(
            f"waiting for {workspace}: another pipeline run ({holder}) holds it ({limit})"))
    except LockBusy as busy:
        after = f" after waiting {busy.waited_s:.0f} s (retrain.wait_timeout_s: {timeout_s})" if wait else ""
        raise WorkspaceBusy(f"{workspace} is busy{after}: another pipeline run ({busy.holder}) holds it") from None
    try:
        yield
    finally:
        release(handle, path)
