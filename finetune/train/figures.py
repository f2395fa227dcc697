"""A training's pictures (PNG): its curves and a grid of validation predictions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from finetune.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from finetune.train.callbacks import EpochStats  # noqa: E402


def curves(history: list[EpochStats]) -> plt.Figure:
    """Train (and validation) loss, and train/validation (test, if scored) accuracy, per epoch."""
    epochs = [s.epoch for s in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [s.train_loss for s in history], marker="o", label="train")
    if all(s.val_loss is not None for s in history):
        left.plot(epochs, [s.val_loss for s in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [s.train_acc for s in history], marker="o", label="train")
    for name in ("val_acc", "test_acc"):
        if all(getattr(s, name) is not None for s in history):
            right.plot(epochs, [getattr(s, name) for s in history], marker="o",
                       label={"val_acc": "validation", "test_acc": "test"}[name])
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    return fig


def prediction_grid(dataset, probs: torch.Tensor, truth: torch.Tensor, classes: list[str], per_class: int = 8) -> plt.Figure:
    """Up to ``per_class`` images (validation) of each of the first two classes (the book shows 8 hot
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
