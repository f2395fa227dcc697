"""One trainer per output folder, and no trainer without the process that started it.

``hold_folder``: an exclusive lock (finetune/core/lock.py) on ``<out>/.train.lock`` for the whole
training, so a second training of the same folder fails at once and names the holder. The file
is removed before the lock is released: ``<out>`` is a DVC output, and after a finished training
it must hold only what the training wrote (a killed training leaves the file; the next one
removes it).

``stop_with_starter``: the training process ends (SIGKILL, like ``kill -9``: the last checkpoint
is whole, since checkpoints are written atomically) when the process that started it ends, e.g.
a killed ``dvc repro``. DVC runs a stage through ``$SHELL -c`` (``/bin/sh`` when unset); bash
replaces itself by the command but dash stays in between and survives the death of DVC, so the
parent-death signal alone is not enough: a watch thread checks the starter itself.

``record_starter``: the starter is noted at a stage module's first line, before torch and MLflow
load (seconds), while it is surely alive; a stage whose ``dvc repro`` was killed even before that
(DVC's ``sh -c`` left to init) ends at once instead of training on with no one to stop it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.core.env import WATCH
from finetune.core.errors import TrainingBusy
from finetune.core.lock import LockBusy, acquire, release

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
POLL_S = 0.5  # how often the watch thread looks at the watched processes
# The shells DVC may run a stage's command with (``$SHELL -c``, ``/bin/sh`` when unset).
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"})
_PR_SET_PDEATHSIG = 1
# DVC sets it for every stage command (dvc/stage/run.py): its starter is DVC, through `sh -c`.
DVC_STAGE_ENV = "DVC_STAGE"
# The processes (pids: a forked child must look again) whose starter is watched already.
_ARMED: set[int] = set()


@contextmanager
def hold_folder(out: Path) -> Iterator[None]:
    """Hold ``out``'s training lock while the block runs; TrainingBusy at once if another has it.

    Under torchrun rank 0 holds it for all ranks: they share the folder, and rank 0 writes it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    try:
        handle = acquire(path)
    except LockBusy as busy:
        pid = busy.holder.pid or "?"
        raise TrainingBusy(
            f"{out} is being trained by another process ({busy.holder}; lock file {path}): two trainings of "
            f"one folder would overwrite each other's checkpoint and MLflow run. Wait for it to finish, or stop "
            f"it (kill {pid}) and rerun: the rerun resumes from its last checkpoint.") from None
    try:
        for leftover in out.glob(".*.tmp"):  # write_atomic's files of a killed training
            leftover.unlink(missing_ok=True)
        yield
    finally:
        release(handle, path, remove=True)


def record_starter(module: str) -> None:
    """Under ``python -m`` on Linux: :func:`stop_with_starter` now, at a stage module's first line,
    before the stage imports its heavy libraries (seconds), while its starter is surely alive. A
    stage that DVC started whose starter has already ended (init is all that is left above DVC's
    ``sh -c``) exits at once with one line: nothing has been done, and nothing would stop it later."""
    if module != "__main__" or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    stop_with_starter()
    # Checked after arming the parent-death signal: a parent that died before it was armed shows up here.
    if os.getppid() != parent or (_ancestry()[1] and os.environ.get(DVC_STAGE_ENV)):
        raise SystemExit(f"error: stage {os.environ.get(DVC_STAGE_ENV) or module} not started: the process that "
                         "started it (dvc repro) has already ended; nothing was done. Rerun `dvc repro` (or the "
                         "flow).")


def stop_with_starter() -> None:
    """End this process when its starter ends (Linux; elsewhere a no-op; once per process: a
    second call does nothing).

    The starter is the nearest ancestor that is not a ``sh -c`` wrapper: ``dvc repro``, a flow,
    a test. A process started by hand from an interactive shell is left alone (``nohup`` must
    work), and so is one whose starter is init. Processes named in ``FINETUNE_WATCH`` are
    watched too; this one's starter is added there for the processes it starts (torchrun)."""
    if not sys.platform.startswith("linux") or os.getpid() in _ARMED:
        return
    _ARMED.add(os.getpid())
    watched = [w for w in os.environ.get(WATCH, "").split() if re.fullmatch(r"\d+:\d+", w)]
    starter = _starter()
    if starter is not None:
        watched.append(starter)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # the direct parent
    if not watched:
        return
    os.environ[WATCH] = " ".join(dict.fromkeys(watched))
    threading.Thread(target=_watch, args=(watched,), name="finetune-starter-watch", daemon=True).start()


def watch_entry(pid: int) -> str:
    """``pid:start`` of a live process, for ``FINETUNE_WATCH``: trainings started below it (through
    ``dvc repro``) stop when it ends."""
    return f"{pid}:{_stat(pid)[2]}"


def _starter() -> str | None:
    """``pid:start`` of the nearest ancestor that is not a ``sh -c`` wrapper; None for init or
    an interactive shell."""
    return _ancestry()[0]


def _ancestry() -> tuple[str | None, bool]:
    """(:func:`_starter`, whether the walk up ended at init: no starter is left above the
    ``sh -c`` wrappers, or there never was one)."""
    pid = os.getppid()
    while pid > 1:
        comm, ppid, start = _stat(pid)
        if comm is None:
            return None, True
        if comm not in SHELLS:
            return f"{pid}:{start}", False
        if "-c" not in _cmdline(pid):
            return None, False  # started by hand: the terminal (SIGHUP) decides, not us
        pid = ppid
    # A container's pid 1 may be DVC itself (`docker run ... dvc repro`): a starter, not init.
    init = _stat(1)[0] or ""
    if pid == 1 and (init == "dvc" or init.startswith("python")):
        return f"1:{_stat(1)[2]}", False
    return None, True


def _watch(watched: list[str]) -> None:
    """Poll the watched processes; SIGKILL this one when any of them is gone."""
    while True:
        for entry in watched:
            pid, _, start = entry.partition(":")
            if _stat(int(pid))[2] != start:
                log.error("stopping: pid %s, which started this training, has ended; the checkpoint of the "
                          "last finished epoch is kept and a rerun resumes from it", pid)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(POLL_S)


def _stat(pid: int) -> tuple[str | None, int, str]:
    """(command name, parent pid, start time in clock ticks) of ``pid``; (None, 0, "") if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, 0, ""
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has ended; only its parent has not collected it yet
        return None, 0, ""
    return comm, int(fields[1]), fields[19]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
