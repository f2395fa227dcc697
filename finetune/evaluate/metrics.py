"""Metrics of a model on the test split, and the challenger against the baseline (numpy and scipy
only: Prefect tasks and reports import this without torch).

Per variant: accuracy, macro precision / recall / F1, ROC-AUC (two classes), log loss, the
confusion matrix and per-class metrics. The comparison: per-metric deltas and an exact McNemar
test on the paired predictions — of the test images exactly one model gets right, is the split
more lopsided than a fair coin would make it?
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune.errors import FinetuneError

# Higher is better for every metric but these.
LOWER_IS_BETTER = frozenset({"log_loss"})
HEADLINE = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")


@dataclass
class VariantEval:
    """One model scored on the test split."""

    name: str
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    classes: list[str]
    paths: list[str] = field(repr=False)
    probs: np.ndarray = field(repr=False)
    truth: np.ndarray = field(repr=False)
    run_id: str | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def score(probs: np.ndarray, truth: np.ndarray, classes: list[str]) -> tuple[dict, dict, list[list[int]]]:
    """Headline metrics (macro averages), per-class metrics and the confusion matrix
    (rows: true class, columns: predicted, in ``classes`` order)."""
    labels = list(range(len(classes)))
    predicted = probs.argmax(1)
    from sklearn import metrics as skm  # here: the flow imports this module for its report (4 s saved)

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0)
    headline = {"accuracy": float(skm.accuracy_score(truth, predicted)),
                "precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
                "log_loss": float(skm.log_loss(truth, probs, labels=labels))}
    if len(classes) == 2 and len(set(truth.tolist())) == 2:
        headline["roc_auc"] = float(skm.roc_auc_score(truth, probs[:, 1]))
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(classes)}
    confusion = skm.confusion_matrix(truth, predicted, labels=labels).tolist()
    return headline, per_class, confusion


def mcnemar(challenger_right: np.ndarray, baseline_right: np.ndarray) -> dict:
    """The exact (binomial) McNemar test on paired right/wrong outcomes of two models.

    ``challenger_only``: images only the challenger gets right; ``baseline_only``: the reverse.
    Under "equally good" each discordant image is a fair coin: the two-sided p-value is
    ``P(X <= min)`` doubled for X ~ Binomial(discordant, 1/2), capped at 1.
    """
    from scipy.stats import binomtest  # here, as sklearn above

    b = int(np.sum(challenger_right & ~baseline_right))
    c = int(np.sum(~challenger_right & baseline_right))
    p_value = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return {"challenger_only": b, "baseline_only": c, "discordant": b + c, "p_value": float(p_value)}


def better(metric: str, a: float, b: float) -> float:
    """How much ``a`` beats ``b`` on ``metric`` (positive: better), whichever way it points."""
    return b - a if metric in LOWER_IS_BETTER else a - b


def compare(challenger: VariantEval, baseline: VariantEval) -> dict:
    """Deltas (challenger − baseline) and the McNemar test; the two must share the test images."""
    if challenger.paths != baseline.paths:
        raise FinetuneError(f"{challenger.name} and {baseline.name} were scored on different test images; "
                            "rerun the evaluate stage after both trained on the same validated files.")
    deltas = {k: challenger.metrics[k] - baseline.metrics[k] for k in challenger.metrics if k in baseline.metrics}
    test = mcnemar(challenger.predicted == challenger.truth, baseline.predicted == baseline.truth)
    return {"challenger": challenger.name, "baseline": baseline.name, "delta": deltas, "mcnemar": test}


def metrics_document(results: list[VariantEval], comparison: dict) -> dict:
    """The dvc metrics JSON: per variant its headline metrics; the comparison and the number of
    test images (per-class detail: :func:`per_class_document`)."""
    document = {r.name: dict(r.metrics) for r in results}
    document["comparison"] = comparison | {"test_images": len(results[0].truth)}
    return document


def per_class_document(results: list[VariantEval]) -> dict:
    """Per variant, each class's precision, recall, F1 and support (the report reads it)."""
    return {r.name: r.per_class for r in results}


def winner(document: dict, metric: str, preferred: str) -> str:
    """The variant with the best ``metric`` in the evaluate stage's metrics; a tie goes to ``preferred``."""
    scores = {name: values[metric] for name, values in document.items() if name != "comparison" and metric in values}
    if not scores:
        raise FinetuneError(f"no variant has the metric {metric!r} (register.metric); the evaluate stage writes "
                            f"{sorted(next(iter(document.values()), {}))}.")
    sign = -1 if metric in LOWER_IS_BETTER else 1
    return max(scores, key=lambda name: (sign * scores[name], name == preferred))


def choose_by_validation(scores: dict[str, dict], preferred: str) -> str:
    """The variant whose kept epoch has the best validation accuracy (``scores``: variant ->
    {"val_acc", "val_loss"}); ties go to the lower validation loss, then to ``preferred``."""
    return max(scores, key=lambda name: (scores[name]["val_acc"], -scores[name]["val_loss"], name == preferred))
