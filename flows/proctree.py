"""Stopping a stage's whole process tree (`dvc repro`, DVC's `sh -c`, the stage, its loader
workers), at its timeout (a :class:`Limit` watched by a :class:`Watchdog`) or when the flow
itself is told to stop (SIGTERM, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import psutil

from finetune.core.guard import SHELLS

DEFAULT_GRACE_S = 15.0  # for callers without params (timeouts.grace_s is the pipeline's)


@dataclass(frozen=True)
class Limit:
    """How long a command may run (None: no limit), the params key that says so, and how long
    its stopped processes get between SIGTERM and SIGKILL."""

    seconds: float | None
    key: str
    grace_s: float

    def watch(self, process: subprocess.Popen) -> Watchdog:
        """A started :class:`Watchdog` for ``process``."""
        watchdog = Watchdog(self.seconds, process, self.grace_s)
        watchdog.start()
        return watchdog


class Watchdog(threading.Thread):
    """Stops a process's tree once ``seconds`` have passed, unless cancelled first."""

    def __init__(self, seconds: float | None, process: subprocess.Popen, grace_s: float) -> None:
        super().__init__(name="finetune-stage-timeout", daemon=True)
        self.seconds, self.process, self.grace_s = seconds, process, grace_s
        self.cancelled = threading.Event()
        self.fired = False

    def run(self) -> None:
        if self.seconds is None or self.cancelled.wait(self.seconds):
            return
        self.fired = True
        stop_tree(self.process, self.grace_s)

    def cancel(self) -> None:
        self.cancelled.set()


class TimedOut(RuntimeError):
    """A command ran past its limit; it was stopped with every process below it."""


def below(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children first); none when it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def send(processes: list[psutil.Process], sig: signal.Signals) -> None:
    """``sig`` to each of ``processes``, then SIGCONT: a stopped process (SIGSTOP, a debugger)
    only acts on SIGTERM once it runs again. Ones that have ended meanwhile are skipped."""
    for process in processes:
        try:
            process.send_signal(sig)
            if sig != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)
        except psutil.Error:
            pass


def is_shell_wrapper(process: psutil.Process) -> bool:
    """Whether ``process`` is a ``sh -c <command>`` that only waits for its command (dash does
    not replace itself by the command as bash does)."""
    try:
        return process.name() in SHELLS and "-c" in process.cmdline()[1:]
    except psutil.Error:
        return False


def stop_tree(process: subprocess.Popen, grace_s: float) -> None:
    """Stop ``process`` (a `dvc repro`) and everything below it, and wait until it has ended.

    First SIGTERM to what runs below it, not to DVC itself: DVC sees its command fail and ends on
    its own, releasing its locks; a command that had already finished (a completed training) is
    committed to dvc.lock, as DVC does not notice anything. Not to a ``sh -c`` wrapper either:
    it would die of it at once and fail a command that finishes cleanly on its SIGTERM; it ends
    with its command, passing on its status. After ``grace_s``, or at once if this is
    interrupted too (a second Ctrl-C), SIGKILL to all that is left."""
    tree = below(process.pid)
    try:
        send([p for p in tree if not is_shell_wrapper(p)], signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    finally:
        # Collected again: a process started since the first look, or reparented below DVC.
        survivors = [p for p in [*tree, *below(process.pid)] if p.is_running()]
        if process.poll() is None:
            survivors.insert(0, psutil.Process(process.pid))
        send(survivors, signal.SIGKILL)
        psutil.wait_procs(survivors, timeout=5)
        process.wait()


EXIT_AFTER_S = 25.0  # after a stop signal: the most an unwinding may take (the issue asks for 30 s)


def stop_on_signals(exit_after_s: float = EXIT_AFTER_S, message: str = "stopped") -> None:
    """Command lines only (the main thread): SIGTERM ends this process as Ctrl-C does, by a
    KeyboardInterrupt, so that everything unwinds: a running stage's processes are stopped
    (tasks/dvc.py stream), the flow run ends and says so (notify), the workspace lock is released
    and child servers (Prefect's ephemeral one) are stopped at exit. By default SIGTERM ends
    Python at once and leaves all of these behind.

    A KeyboardInterrupt can land anywhere, a logging or HTTP client's lock included, and an
    unwinding can then wait forever; so the first signal also arms a deadline: after
    ``exit_after_s`` every process below this one is killed, ``message`` printed, and this one
    exits 130 (its flock on the workspace goes with it)."""

    def interrupt(signum, frame):
        if not getattr(interrupt, "armed", False):
            interrupt.armed = True
            deadline = threading.Timer(exit_after_s, force_exit, (message,))
            deadline.daemon = True  # a clean exit does not wait for it
            deadline.start()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def force_exit(message: str) -> None:
    """Kill everything below this process, say ``message`` and exit 130 now."""
    survivors = below(os.getpid())
    send(survivors, signal.SIGKILL)
    psutil.wait_procs(survivors, timeout=5)
    print(message, file=sys.stderr, flush=True)
    os._exit(130)
