"""The evaluation's pictures (PNG): the variants' curves side by side, confusion matrices, ROC
curves and misclassified images; and the dvc plots data (CSV) behind them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from finetune.core.files import write_atomic  # noqa: E402
from finetune.data.images import load_image  # noqa: E402
from finetune.evaluate.metrics import VariantEval  # noqa: E402


def comparison_curves(histories: dict) -> plt.Figure:
    """Validation accuracy (test accuracy for a training without a validation split that scored
    it) and train loss per epoch of several variants on shared axes (``histories``: variant ->
    DataFrame with epoch, train_loss and val_acc or test_acc)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    watched = set()
    for name, frame in histories.items():
        column = next((c for c in ("val_acc", "test_acc") if c in frame), None)
        if column:
            watched.add(column)
            right.plot(frame["epoch"], frame[column], marker="o", label=name)
        left.plot(frame["epoch"], frame["train_loss"], marker="o", label=name)
    label = " / ".join(sorted({"val_acc": "validation accuracy", "test_acc": "test accuracy"}[c] for c in watched))
    left.set(xlabel="epoch", ylabel="train loss", title="train loss")
    right.set(xlabel="epoch", ylabel=label or "accuracy", title=label or "accuracy", ylim=(0, 1))
    for ax in (left, right):
        ax.legend()
    fig.tight_layout()
    return fig


def confusion(matrix: list[list[int]], classes: list[str], title: str) -> plt.Figure:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    n = len(classes)
    size = min(12, 2.5 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if n <= 20:  # numbers stay legible
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def roc(curves: dict) -> plt.Figure:
    """ROC curves (``curves``: name -> (fpr, tpr, auc)) with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def error_grid(images: list, titles: list[str], title: str, cols: int = 8) -> plt.Figure:
    """Images (PIL) with their captions: the misclassified ones, as a person wants to see them."""
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7, color="red")
    if not images:
        axes[0, 0].text(0, 0.5, "no misclassified test images", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically) and close it; the path."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
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
    roc_curves = {}
    for r in results:
        frame = pd.DataFrame({"path": r.paths, "actual": [r.classes[t] for t in r.truth],
                              "predicted": [r.classes[p] for p in r.predicted],
                              "confidence": r.probs.max(1).round(4)})
        write_atomic(folder / f"predictions_{r.name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
        points = roc_points(r)
        write_atomic(folder / f"roc_{r.name}.csv", lambda tmp, p=points: p.to_csv(tmp, index=False))
        roc_curves[r.name] = (points["fpr"], points["tpr"], skm.auc(points["fpr"], points["tpr"]))
        figures[f"confusion_{r.name}"] = save_png(confusion(r.confusion, r.classes, f"{r.name}: confusion matrix"),
                                               folder / f"confusion_{r.name}.png")
        figures[f"errors_{r.name}"] = save_png(errors_figure(r, dataset, shown), folder / f"errors_{r.name}.png")
    figures["roc"] = save_png(roc(roc_curves), folder / "roc.png")
    histories = {r.name: pd.read_csv(history / f"{r.name}.csv") for r in results if (history / f"{r.name}.csv").exists()}
    if histories:
        figures["curves"] = save_png(comparison_curves(histories), folder / "curves.png")
    return figures


def misclassified(result: VariantEval, limit: int) -> list[int]:
    """Indices of wrongly classified test images, the most confidently wrong first."""
    wrong = np.flatnonzero(result.predicted != result.truth)
    confidence = result.probs.max(1)[wrong]
    return wrong[np.argsort(-confidence, kind="stable")][:limit].tolist()


def error_caption(path: str, predicted: str, confidence: float) -> str:
    """An error grid caption: ``<true class folder>/<file>`` (file names repeat across classes:
    hotdog/0024.jpg and not-hotdog/0024.jpg), then the predicted class and its probability."""
    file = Path(path)
    return f"{file.parent.name}/{file.name}\n→ {predicted} {confidence:.2f}"


def errors_figure(result: VariantEval, dataset: Path, limit: int, title: str | None = None):
    """The grid of misclassified test images with true and predicted class and confidence."""
    chosen = misclassified(result, limit)
    images = [load_image(dataset / result.paths[i]) for i in chosen]
    captions = [error_caption(result.paths[i], result.classes[result.predicted[i]], result.probs[i].max())
                for i in chosen]
    wrong = int((result.predicted != result.truth).sum())
    heading = title or f"{result.name}: {wrong} of {len(result.truth)} test images misclassified"
    return error_grid(images, captions, f"{heading} (most confident first, {len(chosen)} shown; "
                                        "caption: true class/file → predicted, probability)")


def learning_curve(document: dict) -> plt.Figure:
    """The study's learning curve: test accuracy vs train images, each variant's mean over seeds
    with its 95% interval as a band (drawn within 0..1: with two seeds a t-interval reaches far
    past what an accuracy can be), the crossover marked when the curves cross."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = list(document["fractions"].values())
    sizes = [r["train_images"] for r in rows]
    for variant in (document["challenger"], document["baseline"]):
        means = [r[variant]["mean"] for r in rows]
        ax.plot(sizes, means, marker="o", label=variant)
        if all(r[variant]["low"] is not None for r in rows):
            ax.fill_between(sizes, [max(r[variant]["low"], 0.0) for r in rows],
                            [min(r[variant]["high"], 1.0) for r in rows], alpha=0.2)
    if document["crossover_images"] is not None:
        ax.axvline(document["crossover_images"], color="grey", linestyle="--", label="crossover")
    ax.set(xscale="log" if sizes[-1] > 4 * sizes[0] else "linear", xlabel="train images", ylim=(0, 1.02),
           ylabel="test accuracy", title="learning curve (mean, 95% interval over seeds)")
    ax.legend()
    fig.tight_layout()
    return fig
