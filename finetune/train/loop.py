"""The epoch loop: the D2L fine-tuning recipe and the Keras strategies, built from small steps.

``fit`` is the big verb, as fastai's ``fine_tune``: set the strategy's frozen blocks → build
the optimiser at discriminative rates → for each epoch: unfreeze what the plan says, train an
epoch, score the validation split, report to the callbacks, note the best epoch (selection.py),
checkpoint, stop early if told to → keep the selected epoch's weights. A checkpoint after every
epoch (written atomically) lets a rerun after a crash resume at the next epoch with the same
optimiser, schedule, selection and RNG states.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.core.progress import Progress
from finetune.train.callbacks import Callback, EpochStats
from finetune.train.checkpoints import CheckpointWriter, resume, rng_state
from finetune.train.compiling import (
    compile_decision,
    compile_key,
    is_warm,
    mark_after_first_step,
    planned_images,
    use_persistent_cache,
)
from finetune.train.distributed import SINGLE, Dist, interleave
from finetune.train.features import extract_features, head_epoch, split_scores
from finetune.train.health import (
    COLLAPSED,
    DIVERGED,
    TrainingFailed,
    mark,
    one_class,
    predicted_classes,
    recalibrate_batchnorm,
    trainable_batchnorm,
)
from finetune.train.loaders import Loaders
from finetune.train.runtime import Runtime, autocast, predict, to_device
from finetune.train.selection import Selection
from finetune.train.strategy import (
    apply_schedule,
    feature_views,
    freeze,
    group_lrs,
    head_only,
    initial_frozen,
    make_optimizer,
    train_mode,
    unfreeze_for_epoch,
)

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

log = logging.getLogger(__name__)
EPOCH_QUIET_S = 15.0  # off a terminal, progress lines inside an epoch at most this often


@dataclass(frozen=True)
class Fitted:
    """What ``fit`` did: every epoch's stats, the selected epoch's, and where early stopping ended it."""

    history: list[EpochStats]
    selected: EpochStats
    stopped_at: int | None


def train_epoch(model, loader, optimizer, runtime: Runtime, cfg: TrainConfig, progress: Progress | None = None,
                world: int = 1):
    """One pass over ``loader``; returns (summed loss over images, images right, images seen).

    ``world``: processes under DDP, which averages their gradients; a summed loss is scaled by
    it so that a step means what it means in one process."""
    train_mode(model)  # frozen BatchNorm stays in inference mode
    loss_fn = nn.CrossEntropyLoss(reduction=cfg.loss)
    scaler = torch.amp.GradScaler("cuda") if runtime.dtype == torch.float16 and runtime.device.type == "cuda" else None
    total_loss, correct, seen = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        images, labels = to_device(images, labels, runtime)
        with autocast(runtime):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
            objective = loss * world if cfg.loss == "sum" else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            objective.backward()
            optimizer.step()
        batch = labels.numel()
        total_loss += loss.item() * (batch if cfg.loss == "mean" else 1)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += batch
        if progress is not None:
            progress.update(batch)
    return total_loss, correct, seen


def fit(model: nn.Module, data: Loaders, cfg: TrainConfig, runtime: Runtime, out_dir: Path, *,
        fingerprint: str, checkpoint: dict | None = None, extra: dict | None = None,
        callbacks: Sequence[Callback] = (), dist: Dist = SINGLE, key: str = "train") -> Fitted:
    """Train ``model`` on ``data`` for ``cfg.epochs`` (fewer if early stopping ends it),
    continuing from ``checkpoint`` (see load_checkpoint); ``model`` ends with the selected
    epoch's weights (``cfg.select``).

    Checkpoints go to ``out_dir`` after the last epoch and after every epoch that ends
    ``cfg.checkpoint_every_s`` after the last checkpoint (rank 0 only; written in the background
    while the next epoch trains, and on disk when ``fit`` returns), tagged with ``fingerprint``
    (settings, data, starting weights) and holding ``extra`` (e.g. the tracking record's resume
    token, opaque here).
    Each of ``callbacks`` gets every epoch's stats before its checkpoint is written (so that a
    crash in between repeats the epoch rather than losing its record), and the history at the
    end (tracking arrives this way: see finetune/train/callbacks.py). Epochs with a frozen
    backbone train the head on cached features (``cfg.cached_features``). An epoch that diverged
    or collapsed is never kept, and a loss that is not a number ends the training; when no epoch can be kept,
    TrainingFailed, whose message names the settings under ``key`` (e.g. ``train.scratch``).
    """
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    freeze(model, initial_frozen(model, cfg))
    optimizer = make_optimizer(model, cfg)
    selection = Selection.of(cfg)
    history = resume(checkpoint, model, optimizer, cfg, selection) if checkpoint else []
    watched = {"val": data.val, "test": data.test if cfg.test_each_epoch else None}
    network, features = None, None
    checkpoints = CheckpointWriter(out_dir, cfg.checkpoint_every_s) if dist.main else None
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            if selection.stopped_at is not None:
                break  # a resumed training that early stopping had already ended
            if not head_only(cfg, epoch):
                features = None  # the frozen phase is over: free the cached features before training live
            stats, network, features = _epoch(model, network, features, data, watched, optimizer, runtime, cfg,
                                              epoch, dist)
            history.append(_report(stats, cfg, len(data.classes)))
            selection.update(stats, model)
            for callback in callbacks:
                callback.on_epoch_end(stats)
            # Weights that are not a number are lost for good; a loss spike above diverge_loss is
            # marked (never kept) but may recover, so training goes on.
            lost = stats.failure == DIVERGED and not math.isfinite(stats.train_loss)
            final = epoch == cfg.epochs or selection.stopped_at is not None or lost
            if checkpoints is not None and checkpoints.due(final):
                checkpoints.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "fingerprint": fingerprint, "selection": selection.state_dict(),
                    "history": [asdict(s) for s in history], "rng": rng_state(), "extra": extra or {},
                })
            dist.barrier()
            if lost:
                break
    finally:
        if checkpoints is not None:
            checkpoints.wait()  # the last epoch's checkpoint is on disk before anything reads or reports it
    if data.val is None and history and not history[-1].failure and cfg.judge_epochs:
        probe_last_epoch(model, data, history[-1], runtime, cfg, dist)
    return _finish(model, history, selection, callbacks, key)


def _epoch(model: nn.Module, network: nn.Module | None, features, data: Loaders, watched: dict, optimizer,
           runtime: Runtime, cfg: TrainConfig, epoch: int, dist: Dist):
    """One epoch of ``fit``: unfreeze and schedule, then train the head on cached features (frozen
    epochs) or the network live. Returns the stats and the live network and cached features for
    the next epoch (None when they must be made again)."""
    block = unfreeze_for_epoch(model, optimizer, cfg, epoch)
    if block:
        log.info("epoch %d: unfroze %s (lr %.2g)", epoch, block, cfg.lr * cfg.unfreeze_lr_mult)
        network = None  # DDP and compile must see the new set of trainable parameters
    apply_schedule(optimizer, cfg, epoch)
    if head_only(cfg, epoch):
        extracting = features is None
        if extracting:
            features = extract_features(model, data.train, watched, runtime, feature_views(cfg, epoch), dist)
        stats = head_epoch(model, features, optimizer, cfg, epoch)
        stats.features_seconds = features.seconds if extracting else 0.0
        return stats, network, features
    if network is None:
        network = training_network(model, runtime, cfg, dist, data, epoch)
    return run_epoch(network, model, data.train, watched, optimizer, runtime, cfg, epoch, dist), network, None


def probe_last_epoch(model: nn.Module, data: Loaders, last: EpochStats, runtime: Runtime, cfg: TrainConfig,
                     dist: Dist) -> None:
    """Without a validation split nothing watched the epochs: the last one (which ``select: last``
    keeps) is checked for collapse on the train images through the test transform."""
    if data.probe is None:
        return
    scores = watch(model, "val", data.probe, data.train, runtime, cfg, dist)
    if scores["val_classes"] == 1:
        last.failure = COLLAPSED
        log.warning("epoch %d collapsed (one class predicted for every train image; lr %s): never kept",
                    last.epoch, ", ".join(f"{g} {lr:.3g}" for g, lr in last.lrs.items()))


def _finish(model: nn.Module, history: list[EpochStats], selection: Selection,
            callbacks: Sequence[Callback], key: str = "train") -> Fitted:
    """Put the selected epoch's weights into ``model``; tell the callbacks; what was kept.
    TrainingFailed (after the callbacks had the history) when no epoch can be kept."""
    selection.restore(model)
    chosen = selection.selected_epoch(history[-1])
    if chosen is None:
        for callback in callbacks:
            callback.on_fit_end(history)
        raise TrainingFailed(history, key)
    if selection.stopped_at is not None:
        log.info("early stopping after epoch %d: no gain in %s for %d epochs", selection.stopped_at,
                 selection.monitor, selection.patience)
    if chosen != history[-1].epoch:
        log.info("keeping epoch %d: best %s %.4f", chosen, selection.monitor, selection.best_score)
    for callback in callbacks:
        callback.on_fit_end(history)
    return Fitted(history, history[chosen - 1], selection.stopped_at)


def training_network(model: nn.Module, runtime: Runtime, cfg: TrainConfig, dist: Dist, data: Loaders | None = None,
                     epoch: int = 1) -> nn.Module:
    """What the live epochs run: ``model``, wrapped in DistributedDataParallel under torchrun and
    compiled when ``cfg.compile`` says so (auto: on CUDA, when the images planned from ``epoch``
    on repay the compile; see finetune/train/compiling.py). Compiled graphs go to the persistent
    inductor cache under ``cache.dir`` (``data.cache_dir``), marked there once compiled."""
    network = model
    if dist.active:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=ids)
    cache_dir = data.cache_dir if data is not None else None
    key = compile_key(model, data.crop if data is not None else 0, max(1, cfg.batch_size // dist.world),
                      runtime.dtype, runtime.channels_last)
    planned = 0 if data is None else planned_images(data.train_images, cfg.epochs - epoch + 1, cfg.batch_size,
                                                    cfg.max_steps, dist.world)
    compiled, reason = compile_decision(cfg.compile, planned, runtime.device.type, is_warm(cache_dir, key))
    log.info("%s: %s", "compiling" if compiled else "not compiling", reason)
    if compiled:
        if cache_dir is not None:
            use_persistent_cache(cache_dir)
        network = torch.compile(network)
        if cache_dir is not None:
            mark_after_first_step(network, cache_dir, key)
    return network


def run_epoch(network, model, train_loader, watched: dict, optimizer, runtime: Runtime, cfg: TrainConfig,
              epoch: int, dist: Dist = SINGLE) -> EpochStats:
    """Train one epoch through ``network``, then score ``model`` on each loader of ``watched``
    (``val``, ``test``: name → loader or None; each process its share, summed over processes)."""
    lrs = group_lrs(optimizer)
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)  # DistributedSampler: a new order every epoch
    started = time.perf_counter()
    total = len(train_loader.sampler) if cfg.max_steps is None else min(
        len(train_loader.sampler), cfg.max_steps * train_loader.batch_size)
    # quiet_s: an epoch shorter than that logs only its summary line (the study runs dozens)
    with Progress(f"epoch {epoch}/{cfg.epochs}", total=total, unit="img", quiet_s=EPOCH_QUIET_S) as bar:
        loss_sum, correct, seen = train_epoch(network, train_loader, optimizer, runtime, cfg, bar, dist.world)
    seconds = time.perf_counter() - started
    loss_sum, correct, seen = dist.sum([loss_sum, correct, seen])
    scores = {}
    for name, loader in watched.items():
        if loader is not None:
            scores |= watch(model, name, loader, train_loader, runtime, cfg, dist)
    scores.pop("test_loss", None)
    return EpochStats(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), seen / seconds, seconds, lrs, **scores)


def watch(model, name: str, loader, train_loader, runtime: Runtime, cfg: TrainConfig, dist: Dist = SINGLE) -> dict:
    """``<name>_loss``, ``<name>_acc`` of ``model`` on ``loader`` (each process its share, summed),
    and for validation ``val_classes``: how many classes it predicts. One class predicted for
    every image is first checked against stale BatchNorm statistics: they are recomputed over
    ``train_loader`` and the split scored again (finetune/train/health.py)."""
    probs, truth = predict(model, loader, runtime, cfg.max_steps)
    counts = dist.sum(predicted_classes(probs).tolist())
    if name == "val" and cfg.judge_epochs and one_class(torch.tensor(counts)) and trainable_batchnorm(model):
        with autocast(runtime):
            layers = recalibrate_batchnorm(model, (to_device(i, y, runtime)[0] for i, y in train_loader))
        log.info("%s: one class predicted for every image; BatchNorm statistics of %d layers recomputed over "
                 "the train images", name, layers)
        probs, truth = predict(model, loader, runtime, cfg.max_steps)
        counts = dist.sum(predicted_classes(probs).tolist())
    split_loss, right, n = dist.sum(list(split_scores(probs, truth)))
    scores = {f"{name}_loss": split_loss / max(n, 1), f"{name}_acc": right / max(n, 1)}
    if name == "val":
        scores["val_classes"] = sum(1 for c in counts if c > 0)
    return scores


def _report(stats: EpochStats, cfg: TrainConfig, classes: int) -> EpochStats:
    """Log an epoch's one summary line; mark it diverged or collapsed (finetune/train/health.py)."""
    watched = "".join(f", {name} {value:.3f}" for name, value in (
        ("val loss", stats.val_loss), ("val acc", stats.val_acc), ("test acc", stats.test_acc)) if value is not None)
    log.info("epoch %d/%d: train loss %.4f, train acc %.3f%s, %.1f img/s, %.2f s", stats.epoch, cfg.epochs,
             stats.train_loss, stats.train_acc, watched, stats.images_per_s, stats.seconds)
    return mark(stats, classes, cfg.diverge_loss, cfg.judge_epochs)


def predict_all(model, loader, runtime: Runtime, dist: Dist = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels of a whole split in its order, each process scoring its strided
    share (see loaders) and every process receiving all."""
    probs, truth = predict(model, loader, runtime)
    if not dist.active:
        return probs, truth
    parts = dist.gather((probs, truth))
    total = sum(len(t) for _, t in parts)
    return interleave([p for p, _ in parts], total), interleave([t for _, t in parts], total)
