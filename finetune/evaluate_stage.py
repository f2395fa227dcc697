"""The ``evaluate`` stage's outputs: dvc metrics JSON, dvc plots data, the same plots as PNG, a
Markdown report, and the MLflow record (the pipeline's parent run and each variant's run).

Every file is written atomically, and only after every variant was scored: a failed evaluation
leaves the previous outputs as they were.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn import metrics as skm

from finetune import plots, tracking
from finetune.config import Params
from finetune.data.images import load_image
from finetune.evaluate import HEADLINE, VariantEval, evaluate_variants, metrics_document
from finetune.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPaths:
    """Where the stage reads trained models and training histories (from dvc.yaml)."""

    models: Path  # <models>/<variant>/model.pt
    history: Path  # <history>/<variant>.csv: per-epoch stats of the train stage


def run_evaluate(params: Params, paths: EvalPaths, project: Path = Path(".")) -> tuple[list[VariantEval], dict]:
    """Score every variant, compare challenger and baseline, write and log the outputs."""
    results, comparison = evaluate_variants(params, paths.models, project)
    cfg = params.evaluate
    figures = write_plots(results, project / cfg.plots, project / params.data.dir, project / paths.history,
                          cfg.errors_shown)
    document = metrics_document(results, comparison)
    _write_text(project / cfg.metrics, json.dumps(document, indent=2) + "\n")
    _write_text(project / cfg.report, report(results, comparison, params, figures, (project / cfg.report).parent))
    log_evaluation(results, comparison, project, project / cfg.metrics, project / cfg.report, figures)
    return results, comparison


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save(fig, path: Path) -> Path:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plots.plt.close(fig)
    return path


def roc_points(result: VariantEval) -> pd.DataFrame:
    """ROC curve points: class 1 as positive for two classes, else the micro-average over classes."""
    if len(result.classes) == 2:
        fpr, tpr, thresholds = skm.roc_curve(result.truth, result.probs[:, 1], pos_label=1)
    else:
        onehot = np.eye(len(result.classes))[result.truth]
        fpr, tpr, thresholds = skm.roc_curve(onehot.ravel(), result.probs.ravel())
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)})


def write_plots(results: list[VariantEval], folder: Path, dataset: Path, history: Path, shown: int) -> dict[str, Path]:
    """dvc plots data (predictions for confusion matrices, ROC points) and PNGs; the PNG paths."""
    figures: dict[str, Path] = {}
    curves = {}
    for r in results:
        frame = pd.DataFrame({"path": r.paths, "actual": [r.classes[t] for t in r.truth],
                              "predicted": [r.classes[p] for p in r.predicted],
                              "confidence": r.probs.max(1).round(4)})
        write_atomic(folder / f"predictions_{r.name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
        points = roc_points(r)
        write_atomic(folder / f"roc_{r.name}.csv", lambda tmp, p=points: p.to_csv(tmp, index=False))
        curves[r.name] = (points["fpr"], points["tpr"], skm.auc(points["fpr"], points["tpr"]))
        figures[f"confusion_{r.name}"] = _save(plots.confusion(r.confusion, r.classes, f"{r.name}: confusion matrix"),
                                               folder / f"confusion_{r.name}.png")
        figures[f"errors_{r.name}"] = _save(errors_figure(r, dataset, shown), folder / f"errors_{r.name}.png")
    figures["roc"] = _save(plots.roc(curves), folder / "roc.png")
    histories = {r.name: pd.read_csv(history / f"{r.name}.csv") for r in results if (history / f"{r.name}.csv").exists()}
    if histories:
        figures["curves"] = _save(plots.comparison_curves(histories), folder / "curves.png")
    return figures


def misclassified(result: VariantEval, limit: int) -> list[int]:
    """Indices of wrongly classified test images, the most confidently wrong first."""
    wrong = np.flatnonzero(result.predicted != result.truth)
    confidence = result.probs.max(1)[wrong]
    return wrong[np.argsort(-confidence, kind="stable")][:limit].tolist()


def errors_figure(result: VariantEval, dataset: Path, limit: int, title: str | None = None):
    """The grid of misclassified test images with true and predicted class and confidence."""
    chosen = misclassified(result, limit)
    images = [load_image(dataset / result.paths[i]) for i in chosen]
    captions = [f"{Path(result.paths[i]).name}\ntrue {result.classes[result.truth[i]]}\n"
                f"→ {result.classes[result.predicted[i]]} {result.probs[i].max():.2f}" for i in chosen]
    wrong = int((result.predicted != result.truth).sum())
    heading = title or f"{result.name}: {wrong} of {len(result.truth)} test images misclassified"
    return plots.error_grid(images, captions, f"{heading} (most confident first, {len(chosen)} shown)")


def report(results: list[VariantEval], comparison: dict, params: Params, figures: dict[str, Path], base: Path) -> str:
    """The Markdown comparison: metrics table with deltas, McNemar, per-class metrics, pictures."""
    by_name = {r.name: r for r in results}
    a, b = by_name[comparison["challenger"]], by_name[comparison["baseline"]]
    n, classes = len(a.truth), a.classes
    lines = [f"# {a.name} vs {b.name} on {params.data.dir} ({n} test images, {len(classes)} classes)", "",
             *metrics_table(results, comparison), "", mcnemar_sentence(comparison, n), "",
             "## Per class", "", *per_class_table(results), "", "## Confusion matrices (rows: true, columns: predicted)"]
    for r in results:
        lines += ["", f"**{r.name}**", "", *confusion_table(r)]
    lines += ["", "## Runs", ""] + [f"- {r.name}: MLflow run `{r.run_id}`" for r in results]
    lines += ["", "## Pictures", ""] + [f"![{name}]({os.path.relpath(path, base)})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def metrics_table(results: list[VariantEval], comparison: dict) -> list[str]:
    names = [r.name for r in results]
    rows = [f"| metric | {' | '.join(names)} | delta ({comparison['challenger']} − {comparison['baseline']}) |",
            "|---" * (len(names) + 2) + "|"]
    for metric in HEADLINE:
        if metric in comparison["delta"]:
            values = " | ".join(f"{r.metrics[metric]:.4f}" for r in results)
            rows.append(f"| {metric} | {values} | {comparison['delta'][metric]:+.4f} |")
    return rows


def mcnemar_sentence(comparison: dict, n: int) -> str:
    test = comparison["mcnemar"]
    verdict = ("is unlikely to be luck (p < 0.05)" if test["p_value"] < 0.05
               else "could be luck (p ≥ 0.05): more test data would tell")
    return (f"**McNemar (exact)**: of {n} test images the models disagree on {test['discordant']}; "
            f"only {comparison['challenger']} is right on {test['challenger_only']}, only "
            f"{comparison['baseline']} on {test['baseline_only']}. p = {test['p_value']:.4g}: the difference "
            f"{verdict}.")


def per_class_table(results: list[VariantEval]) -> list[str]:
    rows = ["| class | support | " + " | ".join(f"{r.name} precision / recall / F1" for r in results) + " |",
            "|---" * (len(results) + 2) + "|"]
    for name in results[0].classes:
        cells = [f"{r.per_class[name]['precision']:.3f} / {r.per_class[name]['recall']:.3f} / "
                 f"{r.per_class[name]['f1']:.3f}" for r in results]
        rows.append(f"| {name} | {results[0].per_class[name]['support']} | " + " | ".join(cells) + " |")
    return rows


def confusion_table(result: VariantEval) -> list[str]:
    rows = ["| true \\ predicted | " + " | ".join(result.classes) + " |", "|---" * (len(result.classes) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(str(c) for c in row) + " |" for name, row in zip(result.classes, result.confusion, strict=True)]
    return rows


def log_evaluation(results: list[VariantEval], comparison: dict, project: Path, metrics: Path, report_path: Path,
                   figures: dict[str, Path]) -> None:
    """Test metrics into each variant's run; everything into the pipeline's parent run."""
    run_ids = [r.run_id for r in results if r.run_id]
    if not run_ids:
        log.warning("the models carry no MLflow run ids: the evaluation is not logged to MLflow")
        return
    tracking.use_store(project)
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
        log_to_parent(client, parent, results, comparison, [metrics, report_path, *figures.values()])


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


def evaluate_registered(params: Params, uri: str, project: Path = Path(".")) -> VariantEval:
    """A registered model (``models:/name@alias``, ``models:/name/3``, ...) on the current test split."""
    from finetune.evaluate import evaluate_classifier
    from finetune.serving import load_served

    classifier = load_served(uri, project).unwrap_python_model().classifier
    return evaluate_classifier(uri, classifier, project / params.data.dir, project / params.validate_.files,
                               params.evaluate)


def errors_of_model(params: Params, uri: str, out: Path | None, project: Path = Path(".")) -> tuple[Path, int, int]:
    """The error grid of a registered model (e.g. production) on the current test split."""
    result = evaluate_registered(params, uri, project)
    out = out or project / params.evaluate.plots / "errors_production.png"
    wrong = int((result.predicted != result.truth).sum())
    _save(errors_figure(result, project / params.data.dir, params.evaluate.errors_shown,
                        f"{uri}: {wrong} of {len(result.truth)} test images misclassified"), out)
    return out, wrong, len(result.truth)
