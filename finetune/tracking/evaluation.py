"""The evaluation in MLflow: test metrics and a one-line description on each variant's run; the
comparison (both variants' test metrics, the deltas, the verdict as its description, the report
and the plots) on the pipeline's parent run, whose end time the evaluate stage and then the
flow's end move to "now", so that the parent run spans the pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune.evaluate.metrics import VariantEval, metrics_document
from finetune.evaluate.report import verdict_line
from finetune.tracking.inputs import log_data
from finetune.tracking.store import NOTE_TAG, SELECTION_TAG, touch_parent, use_store

log = logging.getLogger(__name__)


def log_evaluation(results: list[VariantEval], comparison: dict, project: Path, files: list[Path],
                   data: tuple[str, str, str]) -> None:
    """Test metrics and the description into each variant's run; the comparison and ``files``
    into the pipeline's parent run; the test split as an input of all of them (``data``: the
    data's url, folder and DVC hash)."""
    run_ids = [r.run_id for r in results if r.run_id]
    if not run_ids:
        log.warning("the models carry no MLflow run ids: the evaluation is not logged to MLflow")
        return
    use_store(project)
    client = MlflowClient()
    try:
        for r in results:
            if r.run_id:
                log_variant(client, r)
                log_data(r.run_id, *data, ("test",))
        parent = client.get_run(run_ids[0]).data.tags.get("mlflow.parentRunId")
    except MlflowException as err:
        log.warning("MLflow has no record of the training runs %s (%s): the evaluation is not logged", run_ids, err)
        return
    if parent:
        log_data(parent, *data, ("test",))
        log_to_parent(client, parent, results, comparison, files)


def log_variant(client: MlflowClient, result: VariantEval) -> None:
    """``eval_*`` metrics and the run's description: "finetune: test accuracy 0.912; kept epoch 4
    of 5 (best: validation accuracy 0.930)", and "no better than chance (...)" when so."""
    now = int(time.time() * 1000)
    client.log_batch(result.run_id, metrics=[mlflow.entities.Metric(f"eval_{k}", float(v), now, 0)
                                             for k, v in result.metrics.items()])
    kept = client.get_run(result.run_id).data.tags.get(SELECTION_TAG)
    line = f"{result.name}: test accuracy {result.metrics['accuracy']:.3f}" + (f"; {kept}" if kept else "")
    if result.chance is not None and not result.chance.above:
        line += f"; {result.chance.reason()}"
    client.set_tag(result.run_id, NOTE_TAG, line)


def log_to_parent(client: MlflowClient, parent: str, results, comparison: dict, files: list[Path]) -> None:
    """The comparison's numbers as metrics of the parent run (``finetune.accuracy``,
    ``scratch.accuracy``, ``delta.accuracy``, ``finetune.chance_p_value``, ...), the verdict
    (:func:`verdict_line`, the report's own) as its description, the report
    and plots as its artifacts (``evaluation/``); then its end time is now."""
    values = {f"{r.name}.{k}": v for r in results for k, v in r.metrics.items()}
    values |= {f"delta.{k}": v for k, v in comparison["delta"].items()}
    values["mcnemar_p_value"] = comparison["mcnemar"]["p_value"]
    values |= {f"{r.name}.chance_p_value": r.chance.p_value for r in results if r.chance is not None}
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in values.items()])
    # The report's own first line (reports/evaluate.md), so both say the same.
    client.set_tag(parent, NOTE_TAG, verdict_line(metrics_document(results, comparison)))
    for path in files:
        client.log_artifact(parent, str(path), "evaluation")
    touch_parent(parent, "FINISHED")
    log.info("evaluation logged to the pipeline's MLflow run %s", parent)
