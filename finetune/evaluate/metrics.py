"""Metrics of a model on the test split, and the challenger against the baseline (numpy and scipy
only: Prefect tasks and reports import this without torch).

Per variant: accuracy, macro precision / recall / F1, ROC-AUC (two classes), log loss, the
confusion matrix and per-class metrics, and the chance floor: the accuracy's exact 95% interval
(Clopper-Pearson) and an exact one-sided binomial test against the majority class's share of
the test split (what a model that always answers that class scores). The comparison: per-metric
deltas and an exact McNemar test on the paired predictions — of the test images exactly one model
gets right, is the split more lopsided than a fair coin would make it?
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from finetune.core.errors import FinetuneError

# Higher is better for every metric but these.
LOWER_IS_BETTER = frozenset({"log_loss"})
HEADLINE = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
CONFIDENCE = 0.95  # of every accuracy interval


@dataclass(frozen=True)
class ChanceTest:
    """A test accuracy against chance: ``right`` of ``images`` against ``chance`` (the majority
    class's share), the exact one-sided binomial p-value, and the level ``alpha`` below which
    the model counts as better than chance (``evaluate.chance_p``)."""

    right: int
    images: int
    chance: float
    p_value: float
    alpha: float

    @property
    def accuracy(self) -> float:
        return self.right / self.images

    @property
    def above(self) -> bool:
        """Better than chance: p below ``alpha``."""
        return self.p_value < self.alpha

    def document(self) -> dict:
        """The keys each variant gets in the evaluate stage's metrics document (flat numbers:
        `dvc metrics show` leaves lists out of its table)."""
        low, high = accuracy_interval(self.right, self.images)
        return {"accuracy_ci95_low": low, "accuracy_ci95_high": high, "chance_accuracy": self.chance,
                "chance_p_value": self.p_value, "above_chance": self.above}

    def reason(self) -> str:
        """``no better than chance (accuracy 0.500, chance 0.500, binomial p = 0.59)``."""
        return chance_words(self.accuracy, self.chance, self.p_value)


def chance_words(accuracy: float, chance: float, p_value: float) -> str:
    """The words every verdict, refusal and doctor finding uses for a model at chance."""
    return f"no better than chance (accuracy {accuracy:.3f}, chance {chance:.3f}, binomial p = {p_value:.2g})"


def accuracy_interval(right: int, images: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95% interval of an accuracy of ``right`` out of ``images``."""
    from scipy.stats import binomtest  # here: the flow imports this module for its report

    if images <= 0:
        raise ValueError("an accuracy interval needs at least one image")
    ci = binomtest(int(right), int(images)).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return float(ci.low), float(ci.high)


def chance_p_value(right: int, images: int, chance: float) -> float:
    """The exact one-sided binomial p-value of ``right`` or more of ``images`` when each image is
    right with probability ``chance``: how often guessing would do this well."""
    from scipy.stats import binomtest

    return float(binomtest(int(right), int(images), chance, alternative="greater").pvalue)


def majority_share(labels: np.ndarray, classes: int) -> float:
    """The largest class's share of ``labels`` (class indices): the accuracy of always answering it."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=classes)
    return float(counts.max() / counts.sum())


def chance_test(truth: np.ndarray, predicted: np.ndarray, classes: int, alpha: float) -> ChanceTest:
    """Predictions on the test split against chance (the majority class's share of ``truth``)."""
    right, images = int(np.sum(predicted == truth)), len(truth)
    chance = majority_share(truth, classes)
    return ChanceTest(right, images, chance, chance_p_value(right, images, chance), alpha)


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
    chance: ChanceTest | None = None  # set by scoring, with evaluate.chance_p

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
    """The dvc metrics JSON: per variant its headline metrics and its chance floor
    (``accuracy_ci95_low``, ``accuracy_ci95_high``, ``chance_accuracy``, ``chance_p_value``,
    ``above_chance``); the comparison, the number of test images and the floor's level
    ``chance_p`` (per-class detail: :func:`per_class_document`)."""
    document = {r.name: dict(r.metrics) | (r.chance.document() if r.chance else {}) for r in results}
    document["comparison"] = comparison | {"test_images": len(results[0].truth)}
    if results[0].chance is not None:
        document["comparison"]["chance_p"] = results[0].chance.alpha
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


def above_chance(entry: dict) -> bool:
    """Whether a variant's entry of the evaluate metrics document says it beat chance; an entry
    written before the floor existed (no ``above_chance``) raises, since nothing is known."""
    if "above_chance" not in entry:
        raise FinetuneError("the evaluate metrics (evaluate.metrics) have no above_chance for a variant: they were "
                            "written before the chance floor existed. Run the evaluate stage again "
                            "(`dvc repro evaluate`).")
    return bool(entry["above_chance"])


def choose_by_validation(scores: dict[str, dict], preferred: str) -> str:
    """The variant whose kept epoch has the best validation accuracy (``scores``: variant ->
    {"val_acc", "val_loss"}); ties go to the lower validation loss (a missing loss loses the
    tie), then to ``preferred``."""
    def key(name: str) -> tuple:
        loss = scores[name].get("val_loss")
        return scores[name]["val_acc"], -(math.inf if loss is None else loss), name == preferred

    return max(scores, key=key)


def validation_uncertainty(info: dict) -> dict | None:
    """The uncertainty of a model's validation accuracy from its model.pt info: over folds
    (``val_source: cross-validation``: ``{"source", "folds", "sd"}``), else the exact 95%
    binomial interval over ``val_images`` (``{"source", "images", "ci95"}``); None when the
    file does not say (model.pt written before these keys)."""
    acc, source = info.get("val_acc"), info.get("val_source") or "validation"
    if acc is None:
        return None
    if source == "cross-validation":
        if info.get("val_acc_sd") is None:
            return None
        return {"source": source, "folds": info.get("val_folds"), "sd": float(info["val_acc_sd"])}
    images = info.get("val_images")
    if not images:
        return None
    return {"source": source, "images": int(images),
            "ci95": list(accuracy_interval(round(float(acc) * int(images)), int(images)))}


def uncertainty_words(value: float, uncertainty: dict | None) -> str:
    """``0.9300 ± 0.0200 (sd over 5 folds)`` or ``0.9300 (95% interval 0.8900–0.9600, 200
    validation images)``; the value alone when nothing is known."""
    if uncertainty is None:
        return f"{value:.4f} (uncertainty not recorded)"
    if uncertainty["source"] == "cross-validation":
        folds = uncertainty.get("folds")
        return f"{value:.4f} ± {uncertainty['sd']:.4f} (sd over {folds if folds else 'the'} folds)"
    low, high = uncertainty["ci95"]
    return f"{value:.4f} (95% interval {low:.4f}–{high:.4f}, {uncertainty['images']} {uncertainty['source']} images)"


def summary_document(document: dict, validation: dict | None) -> dict:
    """What `dvc metrics show` prints, at most 11 numbers whatever the number of variants: for the
    challenger and the baseline the test accuracy (``acc``) and its exact 95% interval
    (``ci95_lo``, ``ci95_up``); ``delta_acc`` (challenger - baseline), the McNemar ``mcnemar_p``,
    ``test_images``; from ``validation`` (the validate stage's metrics; None: left out) whether
    the data passed, ``validated``, and the files it let through, ``files_used``. ``document`` is
    the evaluate metrics document, which keeps every other number."""
    comparison = document["comparison"]
    summary: dict = {}
    for name in (comparison["challenger"], comparison["baseline"]):
        entry = document[name]
        summary[name] = {"acc": entry["accuracy"]}
        if "accuracy_ci95_low" in entry:
            summary[name] |= {"ci95_lo": entry["accuracy_ci95_low"], "ci95_up": entry["accuracy_ci95_high"]}
    summary |= {"delta_acc": comparison["delta"]["accuracy"], "mcnemar_p": comparison["mcnemar"]["p_value"],
                "test_images": comparison["test_images"]}
    if validation is not None:
        summary |= {"validated": validation["passed"], "files_used": validation["used"]}
    return summary
