"""Registry actions as Prefect tasks: the promotion gate after the DVC stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import get_run_logger, task

from finetune.core.config import load_params
from flows.proctree import Limit
from tasks.dvc import stream


class GateFailed(RuntimeError):
    """The promotion gate could not decide (not a refusal: an error); its output is in the log."""


@task(name="promotion-gate")
def promotion_gate(workspace: Path, limit: Limit | None = None) -> dict:
    """`python -m finetune promote` in ``workspace`` (a process of its own, like the stages):
    production moves only if the candidate wins. Returns the recorded decision. ``limit``: how
    long it may run (tasks/dvc.py TimedOut after that)."""
    # The decision comes back on the command's last line: this process need not import MLflow
    # and torch (seconds) to read the promotion log.
    returncode, lines = stream([sys.executable, "-m", "finetune", "promote", "--json"], workspace, get_run_logger(),
                               limit)
    if returncode != 0:
        raise GateFailed(f"`python -m finetune promote` failed in {workspace} (exit {returncode}); "
                         "its output is in the lines above")
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def registration(workspace: Path) -> dict | None:
    """The register stage's last record (register.record), or None when there is none."""
    record = workspace / load_params(workspace / "params.yaml").register_.record
    return json.loads(record.read_text()) if record.exists() else None


def nothing_registered(workspace: Path) -> str | None:
    """Why the last register registered nothing (no compared variant beat chance), or None when
    it registered a version (or left no record: the gate then says what is missing)."""
    record = registration(workspace)
    if record is None or record.get("registered", True):
        return None
    return record.get("reason") or "no reason recorded"
