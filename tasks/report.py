"""The pipeline run's report as a Prefect artifact: the evaluate stage's comparison (the same
Markdown source as reports/evaluate.md), the registered version, the promotion decision and the
stages run. Its key makes the artifact's versions the run history. At the end, the pipeline's
MLflow parent run is closed with the same outcome in its description."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from finetune.core.config import Params, load_params
from finetune.evaluate.metrics import uncertainty_words
from finetune.evaluate.report import comparison_lines, study_verdict, verdict_line

ARTIFACT_KEY = "finetune-pipeline-report"
LINKS = {"runs": "MLflow: this pipeline run's variants", "model": "MLflow: the registered version (its model card)"}


def pipeline_markdown(params: Params, workspace: Path, decision: dict | None, stages: list) -> str:
    """The report from the evaluate stage's metrics, the register record and the gate's decision."""
    lines = [f"# Pipeline run: {workspace.name or workspace}", ""]
    metrics_file = workspace / params.evaluate.metrics
    if metrics_file.exists():
        lines += comparison_lines(json.loads(metrics_file.read_text()))
    for line in outcome_lines(params, workspace, decision):
        lines += ["", line]
    study = study_verdict(params, workspace)
    if study:
        lines += ["", f"**Study** ({params.study.report}): {study}"]
    lines += ["", "| stage | DVC | seconds |", "|---|---|---|"]
    lines += [f"| {s.stage} | {'skipped' if s.skipped else 'ran'} | {s.seconds:.1f} |" for s in stages]
    return "\n".join(lines) + "\n"


def outcome_lines(params: Params, workspace: Path, decision: dict | None) -> list[str]:
    """What the run registered (reports/register.json), or that it registered nothing and why, and
    what the gate decided, one line each."""
    lines = []
    record = workspace / params.register_.record
    if record.exists():
        r = json.loads(record.read_text())
        if r.get("registered", True):
            score = uncertainty_words(r["value"], r.get("uncertainty"))
            lines.append(f"**Registered**: `{r['model_name']}` version {r['version']} ({r['variant']}, "
                         f"{r['metric']} {score}), MLflow run `{r['run_id']}`, alias `candidate`.")
        else:
            lines.append(f"**Registered**: nothing: {r.get('reason', 'no reason recorded')}.")
    if decision:
        before, after = (f"v{v}" if v else "none" for v in (decision["production_before"], decision["production_after"]))
        lines.append(f"**Promotion**: {decision['action']} — production {before} → {after}: {decision['reason']}")
    return lines


def closing_lines(params: Params, workspace: Path, decision: dict | None, pushable: bool,
                  links: dict[str, str] | None = None) -> list[str]:
    """What a finished run prints last, in at most 6 plain lines: the verdict, what was
    registered and what the gate decided, where to look (the report; ``links``: the MLflow view
    of the run, its compare page, the Prefect flow run), and (``pushable``: the workspace has a
    DVC remote) that `dvc push` shares the new data and models."""
    links = links or {}
    lines = []
    metrics_file = workspace / params.evaluate.metrics
    if metrics_file.exists():
        lines.append(f"Verdict: {verdict_line(json.loads(metrics_file.read_text()))}")
    lines += [line.replace("**", "").replace("`", "") for line in outcome_lines(params, workspace, decision)]
    there = "" if workspace.resolve() == Path.cwd().resolve() else f" WORKSPACE={workspace}"
    # Over a local store the UI is `make ui`'s; a tracking server serves its own.
    served = "" if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http") else f" (after `make ui{there}`)"
    lines.append(f"Look: {workspace / params.evaluate.report} · MLflow{served}: {links.get('runs', 'no run recorded')}")
    if "compare" in links or "prefect" in links:
        lines.append(" · ".join(f"{what}: {links[key]}" for key, what in (("compare", "Compare"),
                                                                          ("prefect", "Prefect flow run"))
                                if key in links))
    if pushable:
        lines.append("Share it: `dvc push` sends the new data and models to the DVC remote.")
    return [line if len(line) <= 400 else line[:397] + "..." for line in lines][:6]


@task(name="pipeline-report")
def publish_report(params: Params, workspace: Path, decision: dict | None, stages: list,
                   links: dict[str, str] | None = None) -> str:
    """Publish the report as the Markdown artifact ``finetune-pipeline-report``, and ``links``
    (:func:`look_links`) as link artifacts: the MLflow view of the run and the registered
    version. The report's id."""
    for key, what in LINKS.items():
        if key in (links or {}):
            create_link_artifact(link=links[key], link_text=what, key=f"finetune-{key}-link",
                                 description=f"{what} ({workspace})")
    return str(create_markdown_artifact(markdown=pipeline_markdown(params, workspace, decision, stages),
                                        key=ARTIFACT_KEY,
                                        description=f"fine-tuned vs scratch and the promotion decision ({workspace})"))


@task(name="look-links")
def look_links(workspace: Path) -> dict[str, str]:
    """Where to look: the MLflow UI's view of this pipeline run, its compare page, its parent run
    and the registered version (finetune/tracking/views.py), and the Prefect flow run's page when
    a Prefect server keeps it (PREFECT_API_URL; the ephemeral server of a plain run goes away
    with it). {} with a warning when the tracking store does not answer."""
    from prefect.runtime import flow_run

    from finetune.tracking.views import pipeline_links  # MLflow: seconds to import

    links = {"prefect": flow_run.ui_url} if os.environ.get("PREFECT_API_URL") and flow_run.ui_url else {}
    try:
        params = load_params(workspace / "params.yaml")
        record = workspace / params.register_.record
        r = json.loads(record.read_text()) if record.exists() else {}
        model = (r["model_name"], str(r["version"])) if r.get("registered", True) and r.get("version") else None
        return pipeline_links(workspace, params.data.dir, str(flow_run.id or ""), params.ports.ui, model) | links
    except Exception as err:  # the outputs are written: a missing link is not worth failing the run for
        get_run_logger().warning("no MLflow links: %s", (str(err).splitlines() or [repr(err)])[0][:300])
        return links


@task(name="close-mlflow-run")
def close_pipeline_run(workspace: Path, decision: dict | None, failed: bool = False) -> str | None:
    """End the pipeline's MLflow parent run now, FINISHED (FAILED when a stage failed), with the
    registration and the gate's decision added to its description: its span is the flow's. A
    tracking store that does not answer costs a warning, not the run. The parent's id, or None."""
    from prefect.runtime import flow_run

    # Imported here: MLflow takes seconds to import, and only the flow's end needs it.
    from finetune.tracking.store import close_pipeline_run as close

    logger = get_run_logger()
    key = str(flow_run.id or "")  # the stages' FINETUNE_PIPELINE_RUN (tasks/dvc.py)
    try:
        params = load_params(workspace / "params.yaml")
        outcome = "\n\n".join(outcome_lines(params, workspace, decision))  # the UI renders it as Markdown
        return close(workspace, params.data.dir, key, outcome, "FAILED" if failed else "FINISHED") if key else None
    except Exception as err:  # the outputs are written: the record of the run's span is not worth failing for
        logger.warning("could not close the pipeline's MLflow run: %s", (str(err).splitlines() or [repr(err)])[0][:300])
        return None
