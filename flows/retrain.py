"""Scheduled retraining: refresh the data (a new archive at data.url is a new DVC data version),
run the pipeline, promote only through the gate, report.

`python -m flows.retrain [--workspace DIR]` serves the deployment `retrain.deployment` with the
cron schedule `retrain.cron` against the Prefect server at PREFECT_API_URL (`make scheduler`
starts one on 127.0.0.1 with flows/server.py); `--now` runs one retraining in this process instead. prefect.yaml
declares the same deployment for `prefect deploy` to a process work pool.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from finetune.core.config import load_params
from flows.lock import WorkspaceBusy, workspace_lock
from flows.pipeline import STOPPED, notify_end, run_pipeline
from flows.proctree import below, send, stop_on_signals


@flow(name="finetune-retrain", on_failure=[notify_end], on_crashed=[notify_end], on_cancellation=[notify_end])
def retrain(workspace: str = ".") -> dict:
    """Fetch again, run what changed, the gate, the report. A workspace already training makes
    this run wait or skip (``retrain.if_running``): never two trainings at once."""
    root = Path(workspace).resolve()
    logger = get_run_logger()
    params = load_params(root / "params.yaml")
    cfg = params.retrain
    try:
        with workspace_lock(root, wait=cfg.if_running == "wait", timeout_s=cfg.wait_timeout_s, say=logger.warning):
            runs, decision, _ = run_pipeline(root, refresh=True)
    except WorkspaceBusy as err:
        logger.warning("retraining skipped: %s (retrain.if_running: %s)", err, cfg.if_running)
        return {"skipped": str(err)}
    return {"stages": {run.stage: not run.skipped for run in runs}, "decision": decision}


def serve(root: Path) -> None:
    """Serve the deployment: cron from params.yaml, at most one run at a time (more are queued)."""
    cfg = load_params(root / "params.yaml").retrain
    retrain.serve(name=cfg.deployment, schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
                  parameters={"workspace": str(root)},
                  global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
                  description=__doc__)


def stop_flow_runs(grace_s: float) -> None:
    """When serving ends (SIGTERM: Prefect's runner exits; Ctrl-C): SIGTERM to the flow runs it
    started, each its own process, which then stop their stage and announce the end (notify);
    what is left after ``grace_s`` and 10 s more for the announcement is killed.

    Only the flow runs get the SIGTERM, not what runs below them: a DVC killed first would fail
    the stage before its flow run knew it was stopped (announced as a failure, not a stop)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (make scheduler's, after a Ctrl-C) waits for this
    tree = below(os.getpid())
    runs = psutil.Process().children()
    send(runs, signal.SIGTERM)
    psutil.wait_procs(runs, timeout=grace_s + 10)
    send([process for process in [*tree, *below(os.getpid())] if process.is_running()], signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve the scheduled deployment, or (--now) retrain once."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__)
    parser.add_argument("--workspace", default=".", help="DVC project to retrain (default: here)")
    parser.add_argument("--now", action="store_true", help="retrain once, now, instead of serving the schedule")
    args = parser.parse_args(argv)
    root = Path(args.workspace).resolve()
    timeouts = load_params(root / "params.yaml").timeouts
    if not args.now:
        try:
            serve(root)
        except KeyboardInterrupt:
            pass
        finally:
            stop_flow_runs(timeouts.grace_s)
        return 0
    stop_on_signals()
    try:
        result = retrain.with_options(timeout_seconds=timeouts.flow_s)(str(root))
    except KeyboardInterrupt:
        print(f"retraining {STOPPED}", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"retraining failed: {err}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
