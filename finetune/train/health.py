"""Divergence and collapse, caught as they happen: an epoch that failed is marked, logged with
its learning rate, and never kept (selection.py); a training whose every epoch failed raises
:class:`TrainingFailed`.

Three cases count:

- **diverged**: a loss that is not a number (the training stops there: its weights are lost), or
  a train loss above ``diverge_loss`` × ln(classes) (a uniform guess scores ln(classes): far above
  it the steps are too large; the training goes on, as a spike may recover).
- **collapsed**: one class predicted for every validation image (for a training without a
  validation split, every train image seen through the test transform, after the last epoch).

Why BatchNorm matters for the second: validation runs in eval mode, where BatchNorm uses running
statistics that trail the weights. A network trained from scratch at a high lr, for few steps,
can predict one class in eval mode while its train-mode (batch statistics) predictions are
fine. So before an epoch is called collapsed its BatchNorm statistics are recomputed over the
train images (the weights unchanged, as "precise BN" does) and validation is scored again; only
a network that still predicts one class has collapsed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from finetune.core.errors import FinetuneError
from finetune.train.callbacks import EpochStats

log = logging.getLogger(__name__)
DIVERGED, COLLAPSED = "diverged", "collapsed"
RECALIBRATION_BATCHES = 50  # enough batches for stable statistics; a pass over small data
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class TrainingFailed(FinetuneError):
    """Every epoch of a training diverged or collapsed (or, for ``select: last``, the last)."""

    def __init__(self, history: list[EpochStats], key: str = "train") -> None:
        self.history = history
        failures = ", ".join(f"epoch {s.epoch} {s.failure}" for s in history if s.failure)
        lr = max(history[-1].lrs.values()) if history and history[-1].lrs else float("nan")
        super().__init__(
            f"{key}: no epoch can be kept ({failures}; lr {lr:.3g}): the model predicts one class or its loss "
            f"blew up, so it would be no better than chance. Lower {key}.lr (try a tenth), set {key}.batch_size: "
            f"auto and {key}.epochs: auto when the data is small, or turn the search on (search.enabled: true) "
            "so that the learning rate is chosen on validation; then rerun `dvc repro`.")


def predicted_classes(probs: torch.Tensor) -> torch.Tensor:
    """How many images each class was predicted for (a sum over processes adds these up)."""
    return torch.bincount(probs.argmax(1).cpu(), minlength=probs.shape[1])


def one_class(counts: torch.Tensor) -> bool:
    """Whether predictions of more than one image all name a single class."""
    return int(counts.sum()) > 1 and int((counts > 0).sum()) == 1


def epoch_failure(stats: EpochStats, classes: int, diverge_loss: float, judge: bool = True) -> str | None:
    """``diverged``, ``collapsed`` or None for an epoch's stats (``stats.val_classes``: the number
    of distinct classes predicted on validation, after any BatchNorm recalibration). Without
    ``judge`` only a loss that is not a number fails (smoke tests on a handful of images)."""
    losses = [v for v in (stats.train_loss, stats.val_loss) if v is not None]
    if not all(math.isfinite(v) for v in losses):
        return DIVERGED
    if not judge:
        return None
    if stats.train_loss > diverge_loss * math.log(max(classes, 2)):
        return DIVERGED
    if stats.val_classes == 1:
        return COLLAPSED
    return None


def mark(stats: EpochStats, classes: int, diverge_loss: float, judge: bool = True) -> EpochStats:
    """``stats`` with ``failure`` set (and a warning naming the lr) when the epoch failed."""
    stats.failure = epoch_failure(stats, classes, diverge_loss, judge)
    if stats.failure:
        lrs = ", ".join(f"{group} {lr:.3g}" for group, lr in stats.lrs.items()) or "?"
        why = (f"train loss {stats.train_loss:.4g}" if stats.failure == DIVERGED
               else "one class predicted for every validation image")
        log.warning("epoch %d %s (%s; lr %s): never kept", stats.epoch, stats.failure, why, lrs)
    return stats


def trainable_batchnorm(model: nn.Module) -> list[nn.Module]:
    """``model``'s BatchNorm layers that train (a frozen one keeps its stored statistics)."""
    return [m for m in model.modules() if isinstance(m, BATCHNORMS)
            and any(p.requires_grad for p in m.parameters())]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of ``model``'s trainable BatchNorm layers as the plain
    average over (at most RECALIBRATION_BATCHES of) ``batches``, images already on the model's
    device; weights are unchanged. Returns the number of layers recalibrated."""
    layers = trainable_batchnorm(model)
    if not layers:
        return 0
    saved = [(m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
        m.train()
    for step, images in enumerate(batches):
        if step >= RECALIBRATION_BATCHES:
            break
        model(images)
    for m, (momentum, training) in zip(layers, saved):
        m.momentum = momentum
        m.train(training)
    return len(layers)
