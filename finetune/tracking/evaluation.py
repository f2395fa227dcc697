"""The evaluation in MLflow: test metrics on each variant's run, the comparison and its files on
the pipeline's parent run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune.evaluate.metrics import VariantEval
from finetune.tracking.store import use_store

log = logging.getLogger(__name__)


def log_evaluation(results: list[VariantEval], comparison: dict, project: Path, files: list[Path]) -> None:
    """Test metrics into each variant's run; the comparison and ``files`` into the pipeline's
    parent run."""
    run_ids = [r.run_id for r in results if r.run_id]
    if not run_ids:
        log.warning("the models carry no MLflow run ids: the evaluation is not logged to MLflow")
        return
    use_store(project)
    client = MlflowClient()
    try:
        for r in results:
            if r.run_id:
                for key, value in r.metrics.items():
                    client.log_metric(r.run_id, f"eval_{key}", value)
        parent = client.get_run(run_ids[0]).data.tags.get("mlflow.parentRunId")
    except MlflowException as err:
        log.warning("MLflow has no record of the training runs %s (%s): the evaluation is not logged", run_ids, err)
        return
    if parent:
        log_to_parent(client, parent, results, comparison, files)


def log_to_parent(client: MlflowClient, parent: str, results, comparison: dict, files: list[Path]) -> None:
    """The comparison's numbers as metrics of the parent run, the report and plots as its artifacts."""
    values = {f"{r.name}.{k}": v for r in results for k, v in r.metrics.items()}
    values |= {f"delta.{k}": v for k, v in comparison["delta"].items()}
    values["mcnemar_p_value"] = comparison["mcnemar"]["p_value"]
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in values.items()])
    for path in files:
        client.log_artifact(parent, str(path), "evaluation")
    log.info("evaluation logged to the pipeline's MLflow run %s", parent)
