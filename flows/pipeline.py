"""The main job: the whole DVC pipeline as a Prefect flow, one task per stage, in DAG order, then
the promotion gate, a Markdown report (a Prefect artifact) and notifications.

`python -m flows.pipeline [--workspace DIR]` — without PREFECT_API_URL it runs on Prefect's
local ephemeral server; with it, against that server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from finetune.core.config import TimeoutsConfig, load_params
from finetune.core.env import PIPELINE_START
from finetune.core.errors import FinetuneError
from finetune.ingest.download import check_resolves
from finetune.ingest.fetch import needs_download
from flows.lock import workspace_lock
from flows.notify import notify
from flows.plan import stage_order, stale_stages
from flows.proctree import Limit, TimedOut, stop_on_signals
from tasks.dvc import StageFailed, StageRun, StageTimeout, fetch_stage, run_stage, up_to_date
from tasks.registry import nothing_registered, promotion_gate
from tasks.report import close_pipeline_run, closing_lines, look_links, publish_report

TRAIN_STAGE = ("search@", "train@")  # the stages that make (or continue) the pipeline's parent run


def run_pipeline(root: Path, refresh: bool = False) -> tuple[list[StageRun], dict | None, dict[str, str]]:
    """Every stage of ``root`` (fetch forced when ``refresh``), the gate, the end of the
    pipeline's MLflow parent run (once a training ran: only then is there one), the report and
    its links, notifications. Call it inside a flow, holding the workspace lock. The stages run,
    the gate's decision and where to look (tasks/report.py look_links)."""
    logger = get_run_logger()
    runs: list[StageRun] = []
    attempted: list[str] = []
    os.environ[PIPELINE_START] = str(int(time.time() * 1000))  # every stage's environment copies it
    timeouts = load_params(root / "params.yaml").timeouts
    try:
        run_stages(root, refresh, runs, attempted, Budget(timeouts, time.monotonic() + timeouts.flow_s))
    except Exception:
        if any(stage.startswith(TRAIN_STAGE) for stage in attempted):
            close_pipeline_run(root, None, failed=True)
        raise
    finally:
        os.environ.pop(PIPELINE_START, None)
    for run in runs:
        logger.info("%-20s %s in %.1f s", run.stage, "skipped (up to date)" if run.skipped else "ran",
                    run.seconds)
    params = load_params(root / "params.yaml")
    decision = gate(root, params.timeouts) if any(run.stage == "register" for run in runs) else None
    if any(run.stage.startswith(TRAIN_STAGE) and not run.skipped for run in runs):
        close_pipeline_run(root, decision)
    links = look_links(root)
    publish_report(params, root, decision, runs, links)
    if decision and decision["action"] in ("promoted", "refused"):
        event = "promotion" if decision["action"] == "promoted" else "refusal"
        notify(params.notify, event, {"workspace": str(root), "message": decision["reason"], "decision": decision})
    return runs, decision, links


def gate(root: Path, timeouts: TimeoutsConfig) -> dict | None:
    """The promotion gate's decision; None when the register stage registered nothing (no model
    above chance): the gate then has no new candidate to judge, and the report says why."""
    why = nothing_registered(root)
    if why is None:
        limit = Limit(timeouts.gate_s, "timeouts.gate_s", timeouts.grace_s)
        return promotion_gate.with_options(timeout_seconds=backstop(limit))(root, limit)
    get_run_logger().warning("no promotion gate: the register stage registered nothing (%s)", why)
    return None


@dataclass(frozen=True)
class Budget:
    """The stages' limits (``timeouts``) and the end of the flow's time (``time.monotonic()``)."""

    timeouts: TimeoutsConfig
    deadline: float

    def limit(self, stage: str) -> Limit:
        """How long ``stage`` may run: its own limit, or what is left of the flow's if less (then
        StageTimeout at once when nothing is left: no stage starts after the flow's time is up)."""
        name = stage.partition("@")[0]
        own = Limit(self.timeouts.for_stage(stage),
                    f"timeouts.stage_s.{name if name in self.timeouts.stage_s else 'other'}", self.timeouts.grace_s)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StageTimeout(f"stage {stage!r} not started: the flow ran past its limit of "
                               f"{self.timeouts.flow_s:.0f} s (timeouts.flow_s); raise it in params.yaml if the "
                               "run needs longer", [], stage)
        return own if own.seconds <= left else Limit(left, "timeouts.flow_s", self.timeouts.grace_s)


def backstop(limit: Limit) -> float:
    """Prefect's timeout_seconds for a task that runs a command with ``limit``: later than the
    command's own limit and its stop (a clearer message), for a task stuck elsewhere."""
    return limit.seconds + limit.grace_s + 60


def run_stages(root: Path, refresh: bool, runs: list[StageRun], attempted: list[str], budget: Budget) -> None:
    """Each stage in DAG order into ``runs``, each within its ``budget``; ``attempted`` names
    every stage started (the one that failed included)."""
    # One `dvc status` instead of a `dvc repro` process per unchanged stage (about 1 s each).
    # Once a stage has run, every later one goes through `dvc repro`, which skips it if its
    # inputs came out the same.
    stale = stale_stages(root)
    for stage in stage_order(root):
        attempted.append(stage)
        if stage not in stale and all(run.skipped for run in runs) and not (stage == "fetch" and refresh):
            runs.append(up_to_date(stage))
            continue
        limit = budget.limit(stage)
        task = (fetch_stage if stage == "fetch" else run_stage).with_options(timeout_seconds=backstop(limit))
        runs.append(task(stage, root, force=stage == "fetch" and refresh, limit=limit))


def notify_end(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed, on_cancellation): announce how the run ended, through
    the URLs of the workspace's params.yaml (flows/notify.py)."""
    root = Path(flow_run.parameters.get("workspace", ".")).resolve()
    try:
        cfg = load_params(root / "params.yaml").notify
    except Exception:  # params unreadable: that may be the failure itself; nothing to notify with
        return
    notify(cfg, ending(state), {"message": state.message or str(state.type), "workspace": str(root),
                                "flow": flow.name, "flow_run": str(flow_run.id), "state": state.name})


def ending(state) -> str:
    """The notify event of a final state: crash, cancellation, timeout or failure. A stop asked
    for by a signal (Ctrl-C, SIGTERM: see :func:`stop_on_signals`) is a cancellation; a crash is
    a run whose process died (kill -9, out of memory), as its runner reports it."""
    message = state.message or ""
    # Prefect's Crashed message for a KeyboardInterrupt or a TerminationSignal (prefect/states.py).
    # Cancelling: the state a runner that shuts down (prefect 3.9) hands the cancellation hooks.
    if (state.is_cancelled() or state.is_cancelling() or "aborted by an interrupt signal" in message
            or "aborted by a termination signal" in message):
        return "cancellation"
    if state.is_crashed():
        return "crash"
    # Prefect's own flow timeout names the state TimedOut; a stage's or the gate's, its error.
    if state.name == "TimedOut" or any(name in message for name in (StageTimeout.__name__, TimedOut.__name__)):
        return "timeout"
    return "failure"


@flow(name="finetune-pipeline", on_failure=[notify_end], on_crashed=[notify_end], on_cancellation=[notify_end])
def pipeline(workspace: str = ".") -> tuple[list[StageRun], dict | None, dict[str, str]]:
    """Run every DVC stage of ``workspace`` in order, then the promotion gate; a failed stage
    fails the flow (and nothing after it runs). Waits while another run trains there, saying
    whom it waits for, at most ``retrain.wait_timeout_s``. What :func:`run_pipeline` returns."""
    root = Path(workspace).resolve()
    timeout = load_params(root / "params.yaml").retrain.wait_timeout_s
    with workspace_lock(root, wait=True, timeout_s=timeout, say=get_run_logger().warning):
        return run_pipeline(root)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the flow. A failure ends with one message that says what failed and
    what to do, exit 1; Prefect's own failure reports and tracebacks only with --verbose."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--workspace", default=".", help="DVC project to run (default: here)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Prefect's failure reports and tracebacks on the console")
    parser.add_argument("--tag", metavar="PREFIX",
                        help="after a successful run, commit what it changed in the workspace's git "
                             "and tag that commit PREFIX-<n> (make demo)")
    args = parser.parse_args(argv)
    quiet = None if args.verbose else quiet_console()
    try:
        preflight(Path(args.workspace))
    except FinetuneError as err:
        print(f"pipeline failed before its first stage: {err}", file=sys.stderr)
        return 1
    stop_on_signals(message=STOPPED)
    try:
        flow_s = load_params(Path(args.workspace) / "params.yaml").timeouts.flow_s
        _, decision, links = pipeline.with_options(timeout_seconds=flow_s)(args.workspace)
    except KeyboardInterrupt:
        print(STOPPED, file=sys.stderr)
        return 130
    except Exception as err:  # the flow's state and logs (and the Prefect UI) hold the details
        print(failure_message(err, args.verbose), file=sys.stderr)
        if quiet:
            quiet.closing = True  # the message above is the last word (not "Stopping temporary server")
        return 1
    if args.tag:
        from finetune.demo.workspace import record_run

        print(record_run(Path(args.workspace), args.tag))
    workspace = Path(args.workspace)
    print("\n".join(closing_lines(load_params(workspace / "params.yaml"), workspace, decision, has_remote(workspace),
                                  links)))
    return 0


STOPPED = ("stopped: the running stage was stopped with its processes (a training keeps its last checkpoint "
           "and resumes from it; one that had finished is recorded in dvc.lock) and the workspace is free. "
           "Rerun the same command to go on.")


def has_remote(workspace: Path) -> bool:
    """Whether the DVC project has a remote (in .dvc/config or .dvc/config.local)."""
    files = (workspace / ".dvc" / "config", workspace / ".dvc" / "config.local")
    return any('remote "' in path.read_text() for path in files if path.is_file())


def preflight(workspace: Path) -> None:
    """What fails before Prefect starts (seconds sooner): params.yaml, data.url's host name when
    the fetch stage will have to download (a fresh clone on a machine without network), and the
    ImageNet weights' host when they are needed and not cached."""
    params = load_params(workspace / "params.yaml")
    if needs_download(params.data, workspace):
        check_resolves(params.data.url)
    if params.model.weights == "imagenet":
        from finetune.model.factory import check_weights_reachable  # torch: only when needed

        check_weights_reachable(params.model.arch, params.model.weights)


def failure_message(err: Exception, verbose: bool) -> str:
    """The one final message of a failed run: the failed stage and its own error (which says
    what to do), or the error itself."""
    if isinstance(err, FinetuneError):  # its message says what to do
        return f"pipeline failed: {err}"
    if isinstance(err, StageFailed) and err.errors:
        return f"pipeline failed: stage {err.stage!r} failed: " + "\n".join(err.errors)
    if isinstance(err, StageFailed):
        return f"pipeline failed: {err}"
    return f"pipeline failed: {type(err).__name__}: {err}" + ("" if verbose else " (--verbose shows where)")


class QuietFailures(logging.Filter):
    """Console only: Prefect's reports of a failed task or flow (with tracebacks) and the failed
    stage's error line, which the final message says once; once ``closing``, everything. The
    Prefect API keeps them all."""

    closing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.closing or record.exc_info or getattr(record, "stage_error", False):
            return False
        return "Finished in state Failed" not in record.getMessage()


def quiet_console() -> QuietFailures:
    """Put a QuietFailures filter on Prefect's console handler (set up when prefect was imported)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = QuietFailures()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(quiet)
    return quiet


if __name__ == "__main__":
    raise SystemExit(main())
