"""The main job: the whole DVC pipeline as a Prefect flow, one task per stage, in DAG order, then
the promotion gate, a Markdown report (a Prefect artifact) and notifications.

`python -m flows.pipeline [--workspace DIR]` — without PREFECT_API_URL it runs on Prefect's
local ephemeral server; with it, against that server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger

from finetune.config import load_params
from flows.lock import workspace_lock
from flows.notify import notify
from flows.plan import stage_order, stale_stages
from tasks.dvc import StageRun, fetch_stage, run_stage, up_to_date
from tasks.registry import promotion_gate
from tasks.report import publish_report


def run_pipeline(root: Path, refresh: bool = False) -> tuple[list[StageRun], dict | None]:
    """Every stage of ``root`` (fetch forced when ``refresh``), the gate, the report, notifications.
    Call it inside a flow, holding the workspace lock."""
    logger = get_run_logger()
    runs: list[StageRun] = []
    # One `dvc status` instead of a `dvc repro` process per unchanged stage (about 1 s each).
    # Once a stage has run, every later one goes through `dvc repro`, which skips it if its
    # inputs came out the same.
    stale = stale_stages(root)
    for stage in stage_order(root):
        if stage == "fetch" and refresh:
            runs.append(fetch_stage(stage, root, force=True))
        elif stage not in stale and all(run.skipped for run in runs):
            runs.append(up_to_date(stage))
        else:
            runs.append((fetch_stage if stage == "fetch" else run_stage)(stage, root))
    for run in runs:
        logger.info("%-20s %s in %.1f s", run.stage, "skipped (up to date)" if run.skipped else "ran",
                    run.seconds)
    decision = promotion_gate(root) if any(run.stage == "register" for run in runs) else None
    params = load_params(root / "params.yaml")
    publish_report(params, root, decision, runs)
    if decision and decision["action"] in ("promoted", "refused"):
        event = "promotion" if decision["action"] == "promoted" else "refusal"
        notify(params.notify, event, {"workspace": str(root), "message": decision["reason"], "decision": decision})
    return runs, decision


def notify_failure(flow, flow_run, state) -> None:
    """Flow hook: report a failed run to the webhook (if params.yaml sets one)."""
    root = Path(flow_run.parameters.get("workspace", ".")).resolve()
    try:
        cfg = load_params(root / "params.yaml").notify
    except Exception:  # params unreadable: that may be the failure itself; nothing to notify with
        return
    notify(cfg, "failure", {"workspace": str(root), "flow": flow.name, "flow_run": str(flow_run.id),
                            "message": state.message or str(state.type)})


@flow(name="finetune-pipeline", on_failure=[notify_failure])
def pipeline(workspace: str = ".") -> list[StageRun]:
    """Run every DVC stage of ``workspace`` in order, then the promotion gate; a failed stage
    fails the flow (and nothing after it runs). Waits while another run trains there, saying
    whom it waits for, at most ``retrain.wait_timeout_s``."""
    root = Path(workspace).resolve()
    timeout = load_params(root / "params.yaml").retrain.wait_timeout_s
    with workspace_lock(root, wait=True, timeout_s=timeout, say=get_run_logger().warning):
        runs, _ = run_pipeline(root)
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
