"""Running DVC stages as Prefect tasks, with DVC's output in the task logs."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from prefect import get_run_logger, task

from finetune.workspace import stage_env

# What `dvc repro` prints for a stage whose deps, params and outs are unchanged.
_SKIPPED = "didn't change, skipping"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its output is in the task log."""


@dataclass(frozen=True)
class StageRun:
    """One stage as the flow ran it."""

    stage: str
    seconds: float
    skipped: bool


def stage_order(workspace: Path) -> list[str]:
    """The names of the workspace's dvc.yaml stages, upstream first.

    DVC's graph has an edge from each stage to the stages it depends on, so the reverse of a
    topological order runs every stage after its inputs (.dvc files have no name: left out).
    """
    with Repo(str(workspace)) as repo:
        stages = reversed(list(nx.topological_sort(repo.index.graph)))
        return [stage.name for stage in stages if getattr(stage, "name", None)]


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(stage: str, workspace: Path) -> StageRun:
    """`dvc repro --single-item <stage>` in ``workspace``; DVC itself skips an unchanged stage."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    started = time.monotonic()
    returncode, lines = stream(command, workspace, logger)
    skipped = any(_SKIPPED in line for line in lines)
    if returncode != 0:
        raise StageFailed(f"stage {stage!r} failed in {workspace} (dvc repro exited "
                          f"{returncode}); DVC's output is in the lines above")
    return StageRun(stage, time.monotonic() - started, skipped)


def stream(command: list[str], workspace: Path, logger) -> tuple[int, list[str]]:
    """Run ``command`` in ``workspace`` with the project's environment, every output line into
    ``logger`` as it comes; the exit status and the lines."""
    # One MLflow parent run per flow run: the training stages nest their runs under it.
    env = stage_env() | {"FINETUNE_PIPELINE_RUN": _flow_run_id()}
    lines = []
    with subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            logger.info(lines[-1])
    return process.returncode, lines
