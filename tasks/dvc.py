"""DVC stages as Prefect tasks (`dvc repro --single-item <stage>`), with DVC's output in the task logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from finetune.core.env import PIPELINE_RUN, WATCH
from finetune.core.guard import watch_entry
from finetune.demo.workspace import stage_env
from flows.proctree import DEFAULT_GRACE_S, Limit, TimedOut, stop_tree

# What `dvc repro` prints for a stage whose deps, params and outs are unchanged.
_SKIPPED = "didn't change, skipping"
# How a stage's command prints an error the user can act on (finetune/core/command.py).
_ERROR = "error: "
# DVC's reminder after every stage that wrote dvc.lock or a .gitignore ("To track the changes
# with git, run: git add dvc.lock ..." and "To enable auto staging, run: dvc config
# core.autostage true"): seven times per run. The flow leaves git to the user (it never stages:
# a scheduled retrain must not slip files into a commit someone is preparing), and README.md
# says once how to record a run; so the reminder is left out of the task log.
_GIT_NOTICE = ("To track the changes with git, run:", "To enable auto staging, run:")
_GIT_NOTICE_BODY = ("git add ", "dvc config core.autostage")
# DVC's push notice, after every stage that wrote outputs (eleven times in a demo): the flow's
# closing lines say it once, when the workspace has a DVC remote (flows/pipeline.py).
PUSH_NOTICE = "Use `dvc push` to send your updates to remote storage."


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its output is in the task log (and in ``lines``)."""

    def __init__(self, message: str, lines: list[str] | None = None, stage: str = "") -> None:
        super().__init__(message)
        self.lines = lines or []
        self.stage = stage

    @property
    def errors(self) -> list[str]:
        """The stage's own error message, without its ``error: `` prefix (one line, or several)."""
        found, inside = [], False
        for line in self.lines:
            inside = continues_error(line, inside)
            if inside:
                found.append(line.removeprefix(_ERROR))
        return found


def continues_error(line: str, inside: bool) -> bool:
    """Whether ``line`` is part of a stage's own error message: it starts with ``error: ``
    (finetune/core/command.py), or continues one (a multi-line message) until DVC's ``ERROR:`` line."""
    return line.startswith(_ERROR) or (inside and not line.startswith("ERROR: "))


@dataclass(frozen=True)
class StageRun:
    """One stage as the flow ran it."""

    stage: str
    seconds: float
    skipped: bool


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def up_to_date(stage: str) -> StageRun:
    """A stage that `dvc status` found unchanged, with nothing upstream rerun: no process to start."""
    get_run_logger().info("Stage '%s' %s (dvc status)", stage, _SKIPPED)
    return StageRun(stage, 0.0, True)


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


class StageTimeout(StageFailed):
    """A DVC stage ran past its limit (``timeouts.stage_s``) and was stopped."""


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(stage: str, workspace: Path, force: bool = False, limit: Limit | None = None) -> StageRun:
    """`dvc repro --single-item <stage>` in ``workspace``; DVC itself skips an unchanged stage.
    ``force``: run it even so (the retrain flow's fetch: is there a new archive at the URL?).
    ``limit``: how long it may run (StageTimeout after that)."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    started = time.monotonic()
    try:
        returncode, lines = stream(command, workspace, logger, limit)
    except TimedOut as err:
        raise StageTimeout(f"stage {stage!r} {err}", [], stage) from None
    skipped = any(_SKIPPED in line for line in lines)
    if returncode != 0:
        raise StageFailed(f"stage {stage!r} failed in {workspace} (dvc repro exited "
                          f"{returncode}); DVC's output is in the lines above", lines, stage)
    return StageRun(stage, time.monotonic() - started, skipped)


def stream(command: list[str], workspace: Path, logger, limit: Limit | None = None) -> tuple[int, list[str]]:
    """Run ``command`` in ``workspace`` with the project's environment, every output line into
    ``logger`` as it comes; the exit status and the lines. Past ``limit``, or when this is
    interrupted (Ctrl-C, SIGTERM, a Prefect timeout), the command's whole process tree is stopped
    (flows/proctree.py) before anything else happens; past the limit, TimedOut."""
    # One MLflow parent run per flow run: the training stages nest their runs under it. A
    # training also stops when this flow process ends (killed worker, Ctrl-C), not only its dvc.
    watch = " ".join(filter(None, [os.environ.get(WATCH, ""), watch_entry(os.getpid())]))
    env = stage_env() | {PIPELINE_RUN: _flow_run_id(), WATCH: watch}
    limit = limit or Limit(None, "", DEFAULT_GRACE_S)
    lines: list[str] = []
    in_error = False
    # A session of its own: a Ctrl-C at the terminal reaches this process alone, which stops the
    # command's processes below DVC and lets DVC record a command that had finished (proctree.py).
    with subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, start_new_session=True) as process:
        assert process.stdout is not None
        watchdog = limit.watch(process)
        try:
            for line in without_git_notices(raw.rstrip() for raw in process.stdout):
                lines.append(line)
                in_error = continues_error(line, in_error)
                # Marked, so that the flow's console can leave it to the final message (flows/pipeline.py).
                logger.info(line, extra={"stage_error": in_error})
            process.wait()
        except BaseException:
            watchdog.cancel()
            stop_tree(process, limit.grace_s)
            raise
        watchdog.cancel()
        watchdog.join()  # a tree being stopped right now: wait for the end of it
    if watchdog.fired:
        raise TimedOut(f"ran past its limit of {limit.seconds:.0f} s ({limit.key}) and was stopped with every "
                       f"process it started; raise {limit.key} in params.yaml if it needs longer, or see in the "
                       "lines above where it hung")
    return process.returncode, lines


def without_git_notices(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` less DVC's git reminders (see _GIT_NOTICE) and the blank lines around them, and
    its push notice (PUSH_NOTICE)."""
    blanks = 0  # blank lines held back: they belong to a reminder if one follows
    in_notice = False
    for line in lines:
        text = line.strip()
        if not text:
            blanks += 1
            continue
        if text == PUSH_NOTICE:  # ends a reminder too: what follows is the stage's own again
            blanks, in_notice = 0, False
            continue
        if text in _GIT_NOTICE or (in_notice and text.startswith(_GIT_NOTICE_BODY)):
            blanks, in_notice = 0, True
            continue
        if not in_notice:
            yield from [""] * blanks
        blanks, in_notice = 0, False
        yield line
    if not in_notice:
        yield from [""] * blanks


# The fetch stage's messages for a network that failed on every attempt (finetune/ingest/download.py).
_TRANSIENT = ("Could not download", "The server or the connection is failing")
# ... and for a host it could not reach at all (no DNS, no route, refused): no wait helps.
_UNREACHABLE = "Not retried"


def network_failure(task, task_run, state) -> bool:
    """Retry the stage only when the network failed on the way (timeouts, resets, 5xx), not
    for a host that cannot be reached at all, a bad checksum or archive."""
    try:
        state.result()
    except StageFailed as err:
        if any(_UNREACHABLE in line for line in err.lines):
            return False
        return any(marker in line for line in err.lines for marker in _TRANSIENT)
    except Exception:
        return False
    return False


# The download itself retries timeouts, dropped connections and 5xx (data.retries); the task
# retries the whole stage on top, with a longer backoff, for outages longer than a few seconds.
# An offline machine (no DNS, no route) fails at once at both levels.
fetch_stage = run_stage.with_options(retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=network_failure)
