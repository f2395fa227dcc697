"""The pipeline run's report as a Prefect artifact: the evaluate stage's comparison (the same
Markdown source as reports/evaluate.md), the registered version, the promotion decision and the
stages run. Its key makes the artifact's versions the run history."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune.config import Params
from finetune.evaluate.report import comparison_lines

ARTIFACT_KEY = "finetune-pipeline-report"


def pipeline_markdown(params: Params, workspace: Path, decision: dict | None, stages: list) -> str:
    """The report from the evaluate stage's metrics, the register record and the gate's decision."""
    lines = [f"# Pipeline run: {workspace.name or workspace}", ""]
    metrics_file = workspace / params.evaluate.metrics
    if metrics_file.exists():
        lines += comparison_lines(json.loads(metrics_file.read_text()))
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


@task(name="pipeline-report")
def publish_report(params: Params, workspace: Path, decision: dict | None, stages: list) -> str:
    """Publish the report as the Markdown artifact ``finetune-pipeline-report``; its id."""
    return str(create_markdown_artifact(markdown=pipeline_markdown(params, workspace, decision, stages),
                                        key=ARTIFACT_KEY,
                                        description=f"fine-tuned vs scratch and the promotion decision ({workspace})"))
