"""Registry actions as Prefect tasks: the promotion gate after the DVC stages."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import get_run_logger, task

from finetune.config import load_params
from finetune.registry import promotion_log
from tasks.dvc import stream


class GateFailed(RuntimeError):
    """The promotion gate could not decide (not a refusal: an error); its output is in the log."""


@task(name="promotion-gate")
def promotion_gate(workspace: Path) -> dict:
    """`python -m finetune promote` in ``workspace`` (a process of its own, like the stages):
    production moves only if the candidate wins. Returns the recorded decision."""
    returncode, _ = stream([sys.executable, "-m", "finetune", "promote"], workspace, get_run_logger())
    if returncode != 0:
        raise GateFailed(f"`python -m finetune promote` failed in {workspace} (exit {returncode}); "
                         "its output is in the lines above")
    return promotion_log(load_params(workspace / "params.yaml"), workspace)[-1]
