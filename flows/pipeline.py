"""The main job: the whole DVC pipeline as a Prefect flow, one task per stage, in DAG order.

`python -m flows.pipeline [--workspace DIR]` — without PREFECT_API_URL it runs on Prefect's
local ephemeral server; with it, against that server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.dvc import StageRun, run_stage, stage_order
from tasks.registry import promotion_gate


@flow(name="finetune-pipeline")
def pipeline(workspace: str = ".") -> list[StageRun]:
    """Run every DVC stage of ``workspace`` in order, then the promotion gate; a failed stage
    fails the flow (and nothing after it runs)."""
    root = Path(workspace).resolve()
    logger = get_run_logger()
    runs = []
    for stage in stage_order(root):
        runs.append(run_stage(stage, root))
    for run in runs:
        logger.info("%-20s %s in %.1f s", run.stage, "skipped (up to date)" if run.skipped else "ran",
                    run.seconds)
    if any(run.stage == "register" for run in runs):
        promotion_gate(root)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the flow; exit 1 (no traceback) when a stage failed."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--workspace", default=".", help="DVC project to run (default: here)")
    args = parser.parse_args(argv)
    try:
        pipeline(args.workspace)
    except Exception as err:  # the flow's state and logs hold the details
        print(f"pipeline failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
