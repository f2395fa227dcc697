"""Which epoch's weights a training keeps, and when it stops: the validation split decides.

``select: best`` keeps the weights of the epoch with the best ``monitor`` (val_acc: highest,
val_loss: lowest). A tie is broken by the other score (the lower validation loss, the higher
accuracy), and an exact tie goes to the later epoch: on a small split the first epoch ties often
and has learned least. An epoch that diverged or collapsed (finetune/train/health.py) is never
kept. ``early_stopping`` ends training after ``patience`` epochs in a row without a gain of at
least ``min_delta`` (as Keras' EarlyStopping).
The state goes into every checkpoint, so a resumed training selects and stops the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from finetune.train.callbacks import EpochStats

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig


@dataclass
class Selection:
    """The best epoch so far (its score and, for ``select: best``, a CPU copy of its weights) and
    early stopping's count of epochs without a gain."""

    monitor: str
    keep_best: bool
    patience: int | None
    min_delta: float
    best_epoch: int | None = None
    best_score: float | None = None
    best_tiebreak: float | None = None  # the best epoch's second score (see _tiebreak)
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    stale: int = 0  # epochs since the last gain of at least min_delta
    stopped_at: int | None = None  # the epoch after which early stopping ended training

    @classmethod
    def of(cls, cfg: TrainConfig) -> Selection:
        stopping = cfg.early_stopping
        return cls(cfg.monitor, cfg.select == "best", stopping.patience if stopping else None,
                   stopping.min_delta if stopping else 0.0)

    @property
    def watching(self) -> bool:
        """Whether anything reads the validation score (else a training without validation)."""
        return self.keep_best or self.patience is not None

    def gain(self, score: float) -> float:
        """How much ``score`` beats the best so far (positive: better), whichever way it points."""
        if self.best_score is None:
            return float("inf")
        return self.best_score - score if self.monitor == "val_loss" else score - self.best_score

    def update(self, stats: EpochStats, model: nn.Module) -> None:
        """Record epoch ``stats`` (after it trained ``model``): a new best, and the stale count."""
        score = getattr(stats, self.monitor)
        if stats.failure is not None:  # never kept, and no gain for early stopping
            self.stale += 1
            self._maybe_stop(stats.epoch)
            return
        if score is None:
            if self.watching:
                raise ValueError(f"epoch {stats.epoch} has no {self.monitor}: selection needs a validation split")
            return
        gain = self.gain(score)
        self.stale = 0 if gain >= self.min_delta and gain > 0 else self.stale + 1
        if gain > 0 or (gain == 0 and self._tiebreak(stats) >= (self.best_tiebreak or 0.0)):
            self.best_epoch, self.best_score, self.best_tiebreak = stats.epoch, score, self._tiebreak(stats)
            if self.keep_best:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._maybe_stop(stats.epoch)

    def _maybe_stop(self, epoch: int) -> None:
        if self.patience is not None and self.stale >= self.patience:
            self.stopped_at = epoch

    def _tiebreak(self, stats: EpochStats) -> float:
        """The second score, higher is better: minus the validation loss, or the accuracy."""
        other = stats.val_acc if self.monitor == "val_loss" else stats.val_loss
        if other is None:
            return 0.0
        return other if self.monitor == "val_loss" else -other

    def selected_epoch(self, last: EpochStats) -> int | None:
        """The epoch whose weights the training keeps (``last``: the final epoch's stats); None
        when no epoch can be kept (every one failed, or ``select: last`` and the last failed)."""
        if self.keep_best:
            return self.best_epoch
        return None if last.failure else last.epoch

    def restore(self, model: nn.Module) -> None:
        """Put the kept weights into ``model`` (nothing to do for ``select: last``)."""
        if self.keep_best and self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "best_tiebreak": self.best_tiebreak,
                "best_weights": self.best_weights, "stale": self.stale, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        for key in ("best_epoch", "best_score", "best_tiebreak", "best_weights", "stale", "stopped_at"):
            setattr(self, key, state.get(key))
        self.stale = self.stale or 0
