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
    dogs and 8 others), titled with the true and predicted label and the confidence.

    One picture with the images laid out in it, not one subplot per image: a subplot grid took
    0.6 s of every training to lay out and save, this takes a tenth of that."""
    shown = [i for c in range(min(2, len(classes))) for i in (truth == c).nonzero().flatten()[:per_class].tolist()]
    tiles = [_as_picture(dataset[i][0]) for i in shown]
    cols, rows = per_class, max(1, -(-len(shown) // per_class))
    height = max((t.shape[0] for t in tiles), default=1)
    width = max((t.shape[1] for t in tiles), default=1)
    gap, title = max(2, width // 10), max(8, height // 2)  # between images; room for two lines of title
    canvas = torch.ones(rows * (height + title), cols * (width + gap), 3)
    fig, ax = plt.subplots(figsize=(1.6 * cols, 1.9 * rows))
    for k, (index, tile) in enumerate(zip(shown, tiles, strict=True)):
        top, left = (k // cols) * (height + title) + title, (k % cols) * (width + gap)
        canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
        predicted = int(probs[index].argmax())
        right = predicted == int(truth[index])
        ax.text(left + width / 2, top - 1, f"{classes[int(truth[index])]}\n→ {classes[predicted]} "
                f"{probs[index, predicted]:.2f}", ha="center", va="bottom", fontsize=7,
                color="green" if right else "red")
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    return fig


def _as_picture(image: torch.Tensor) -> torch.Tensor:
    """An image of a dataset as height x width x RGB in [0, 1]: uint8 from the decode cache, or
    normalised floats from the PIL transforms."""
    if image.dtype == torch.uint8:
        return image.float().div(255).permute(1, 2, 0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)
