"""The recipe fitted to the data: ``batch_size: auto`` and ``epochs: auto`` resolved from the
number of train images, and a warning before a training that would make too few optimizer steps.

The book's recipe (batch 128, 5 epochs) makes 80 steps on hotdog.zip's 2,000 train images, but
one step per epoch on a user's 72 photos: five steps in all, and a model that never left chance.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

log = logging.getLogger(__name__)
AUTO_MAX_BATCH = 128  # the book's batch: auto never goes above it
AUTO_MIN_EPOCHS = 5  # the book's epochs: auto never trains fewer


def auto_batch(n_train: int) -> int:
    """A batch of train/8 images (so that an epoch makes about 8 steps), between 2 (BatchNorm
    needs two images to normalise a batch) and the book's 128."""
    return max(2, min(AUTO_MAX_BATCH, n_train // 8))


def steps_per_epoch(n_train: int, batch_size: int, max_steps: int | None) -> int:
    """Optimizer steps in one epoch over ``n_train`` images (the last batch may be short)."""
    steps = math.ceil(n_train / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def fit_recipe(cfg: TrainConfig, n_train: int, key: str = "train") -> TrainConfig:
    """``cfg`` with ``auto`` batch size and epochs resolved for ``n_train`` images; a warning
    naming the fix (``key``: where the settings live, e.g. ``train.scratch``) when the training
    would make fewer than ``cfg.min_steps`` optimizer steps."""
    batch = auto_batch(n_train) if cfg.batch_size == "auto" else cfg.batch_size
    per_epoch = steps_per_epoch(n_train, batch, cfg.max_steps)
    epochs = cfg.epochs
    if epochs == "auto":
        epochs = max(AUTO_MIN_EPOCHS, math.ceil(cfg.auto_steps / per_epoch))
    total = per_epoch * epochs
    if total < cfg.min_steps:
        log.warning(
            "%s: %d train images at batch_size %d make %d step(s) per epoch, %d in all over %d epochs: fewer than "
            "%s.min_steps (%d), too few for most networks to leave chance. Set %s.batch_size: auto and %s.epochs: "
            "auto in params.yaml (or a smaller batch_size / more epochs).", key, n_train, batch, per_epoch, total,
            epochs, key, cfg.min_steps, key, key)
    if (batch, epochs) == (cfg.batch_size, cfg.epochs):
        return cfg
    log.info("%s: batch_size %s -> %d, epochs %s -> %d for %d train images (%d steps)", key, cfg.batch_size,
             batch, cfg.epochs, epochs, n_train, total)
    return replaced(cfg, batch_size=batch, epochs=epochs)


def replaced(cfg, **changes):
    """``cfg`` with ``changes``: a pydantic section (a copy) or the bench's plain namespace."""
    if hasattr(cfg, "model_copy"):
        return cfg.model_copy(update=changes)
    return SimpleNamespace(**(vars(cfg) | changes))
