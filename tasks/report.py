"""The pipeline run's report: fine-tuned vs scratch, McNemar, the promotion decision, MLflow ids;
as Markdown, published as a Prefect artifact with a key (its versions are the run history)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune.config import Params

ARTIFACT_KEY = "finetune-pipeline-report"
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")


def pipeline_markdown(params: Params, workspace: Path, decision: dict | None, stages: list) -> str:
    """The report from the evaluate stage's metrics, the register record and the gate's decision."""
    lines = [f"# Pipeline run: {workspace.name or workspace}", ""]
    metrics_file = workspace / params.evaluate.metrics
    if metrics_file.exists():
        lines += _comparison(json.loads(metrics_file.read_text()))
    record = workspace / params.register_.record
    if record.exists():
        r = json.loads(record.read_text())
        lines += ["", f"**Registered**: `{r['model_name']}` version {r['version']} ({r['variant']}, "
                      f"{r['metric']} {r['value']:.4f}), MLflow run `{r['run_id']}`, alias `candidate`."]
    if decision:
        lines += ["", f"**Promotion**: {decision['action']} — production "
                      f"v{decision['production_before']} → v{decision['production_after']}: {decision['reason']}"]
    lines += ["", "| stage | DVC | seconds |", "|---|---|---|"]
    lines += [f"| {s.stage} | {'skipped' if s.skipped else 'ran'} | {s.seconds:.1f} |" for s in stages]
    return "\n".join(lines) + "\n"


def _comparison(document: dict) -> list[str]:
    comparison = document["comparison"]
    a, b = comparison["challenger"], comparison["baseline"]
    rows = [f"| metric | {a} | {b} | delta |", "|---|---|---|---|"]
    rows += [f"| {m} | {document[a][m]:.4f} | {document[b][m]:.4f} | {comparison['delta'][m]:+.4f} |"
             for m in METRICS if m in comparison["delta"]]
    test = comparison["mcnemar"]
    rows += ["", f"**McNemar (exact)**: p = {test['p_value']:.4g} ({test['challenger_only']} images only {a} "
                 f"gets right, {test['baseline_only']} only {b})."]
    return rows


@task(name="pipeline-report")
def publish_report(params: Params, workspace: Path, decision: dict | None, stages: list) -> str:
    """Publish the report as the Markdown artifact ``finetune-pipeline-report``; its id."""
    return str(create_markdown_artifact(markdown=pipeline_markdown(params, workspace, decision, stages),
                                        key=ARTIFACT_KEY,
                                        description=f"fine-tuned vs scratch and the promotion decision ({workspace})"))
