"""Pictures a person looks at first: training curves and a grid of test predictions (PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from finetune.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def curves(history) -> plt.Figure:
    """Train loss, and train/test accuracy, per epoch."""
    epochs = [s.epoch for s in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [s.train_loss for s in history], marker="o")
    left.set(xlabel="epoch", ylabel="train loss", title="loss")
    right.plot(epochs, [s.train_acc for s in history], marker="o", label="train")
    right.plot(epochs, [s.test_acc for s in history], marker="o", label="test")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    return fig


def prediction_grid(dataset, probs: torch.Tensor, truth: torch.Tensor, classes: list[str], per_class: int = 8) -> plt.Figure:
    """Up to ``per_class`` test images of each of the first two classes (the book shows 8 hot
    dogs and 8 others), titled with the true and predicted label and the confidence."""
    shown = [i for c in range(min(2, len(classes))) for i in (truth == c).nonzero().flatten()[:per_class].tolist()]
    cols = per_class
    rows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown, strict=False):
        image, _ = dataset[index]
        # uint8 from the decode cache, or normalised floats from the PIL transforms
        shown_image = image.float() / 255 if image.dtype == torch.uint8 else (image * std + mean).clamp(0, 1)
        ax.imshow(shown_image.permute(1, 2, 0).numpy())
        predicted = int(probs[index].argmax())
        right = predicted == int(truth[index])
        ax.set_title(f"{classes[int(truth[index])]}\n→ {classes[predicted]} {probs[index, predicted]:.2f}",
                     fontsize=7, color="green" if right else "red")
    fig.tight_layout()
    return fig


def comparison_curves(histories: dict) -> plt.Figure:
    """Test accuracy and train loss per epoch of several variants on shared axes
    (``histories``: variant -> DataFrame with epoch, test_acc, train_loss)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, frame in histories.items():
        right.plot(frame["epoch"], frame["test_acc"], marker="o", label=name)
        left.plot(frame["epoch"], frame["train_loss"], marker="o", label=name)
    left.set(xlabel="epoch", ylabel="train loss", title="train loss")
    right.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0, 1))
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
