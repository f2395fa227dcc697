"""DVC stages as Prefect tasks (`dvc repro --single-item <stage>`), with DVC's output in the task logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from finetune.demo.workspace import stage_env
from finetune.train.guard import WATCH_ENV, watch_entry

# What `dvc repro` prints for a stage whose deps, params and outs are unchanged.
_SKIPPED = "didn't change, skipping"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its output is in the task log (and in ``lines``)."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or []


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


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(stage: str, workspace: Path, force: bool = False) -> StageRun:
    """`dvc repro --single-item <stage>` in ``workspace``; DVC itself skips an unchanged stage.
    ``force``: run it even so (the retrain flow's fetch: is there a new archive at the URL?)."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    started = time.monotonic()
    returncode, lines = stream(command, workspace, logger)
    skipped = any(_SKIPPED in line for line in lines)
    if returncode != 0:
        raise StageFailed(f"stage {stage!r} failed in {workspace} (dvc repro exited "
                          f"{returncode}); DVC's output is in the lines above", lines)
    return StageRun(stage, time.monotonic() - started, skipped)


def stream(command: list[str], workspace: Path, logger) -> tuple[int, list[str]]:
    """Run ``command`` in ``workspace`` with the project's environment, every output line into
    ``logger`` as it comes; the exit status and the lines."""
    # One MLflow parent run per flow run: the training stages nest their runs under it. A
    # training also stops when this flow process ends (killed worker, Ctrl-C), not only its dvc.
    watch = " ".join(filter(None, [os.environ.get(WATCH_ENV, ""), watch_entry(os.getpid())]))
    env = stage_env() | {"FINETUNE_PIPELINE_RUN": _flow_run_id(), WATCH_ENV: watch}
    lines = []
    with subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            logger.info(lines[-1])
    return process.returncode, lines


# The fetch stage's messages for a network that failed on every attempt (finetune/data/download.py).
_TRANSIENT = ("Could not download", "The server or the connection is failing")


def network_failure(task, task_run, state) -> bool:
    """Retry the stage only when the network failed, not for a bad checksum or archive."""
    try:
        state.result()
    except StageFailed as err:
        return any(marker in line for line in err.lines for marker in _TRANSIENT)
    except Exception:
        return False
    return False


# The download itself retries connection errors and 5xx (data.retries); the task retries the
# whole stage on top, with a longer backoff, for outages longer than a few seconds.
fetch_stage = run_stage.with_options(retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=network_failure)
