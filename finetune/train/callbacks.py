"""What ``fit`` reports, and to whom: per-epoch stats handed to callback objects.

Tracking (one record per training, finetune/tracking/runs.py) and anything else that watches a
training is a :class:`Callback` handed to ``fit`` (as DVCLive's and fastai's callbacks, or
Lightning's loggers, are), so the loop itself knows nothing of where its numbers go.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochStats:
    """What one epoch measured; ``lrs`` per parameter group at the epoch's end. The validation
    numbers are None without a validation split; ``test_acc`` is None unless ``test_each_epoch``
    asks for it (the book's plot: never read by any decision)."""

    epoch: int
    train_loss: float
    train_acc: float
    images_per_s: float
    seconds: float
    lrs: dict[str, float] = field(default_factory=dict)
    features_seconds: float = 0.0  # computing cached backbone features before this epoch (if it did)
    val_loss: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    val_classes: int | None = None  # distinct classes predicted on validation (1: collapsed)
    failure: str | None = None  # diverged | collapsed: never kept (finetune/train/health.py)


class Callback:
    """Hooks ``fit`` calls; each does nothing unless a subclass overrides it."""

    def on_epoch_end(self, stats: EpochStats) -> None:
        """After each epoch, before its checkpoint is written: a crash in between repeats the
        epoch rather than losing its record."""

    def on_fit_end(self, history: list[EpochStats]) -> None:
        """After the last epoch (and its checkpoint)."""

    def on_result(self, result: dict) -> None:
        """Once the kept weights are scored outside the loop (the study's test split): the numbers
        the training ends with (plain values by name)."""
