"""The epoch loop: the D2L fine-tuning recipe and the Keras strategies, built from small steps.

``fit`` is the big verb, as fastai's ``fine_tune``: set the strategy's frozen blocks → build
the optimiser at discriminative rates → for each epoch: unfreeze what the plan says, train an
epoch, evaluate, report to the callbacks, checkpoint. A checkpoint after every epoch (written
atomically) lets a rerun after a crash resume at the next epoch with the same optimiser,
schedule and RNG states.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.config import TrainConfig
from finetune.progress import Progress
from finetune.train.callbacks import Callback, EpochStats
from finetune.train.checkpoints import resume, rng_state, save_checkpoint
from finetune.train.distributed import SINGLE, Dist, interleave
from finetune.train.features import extract_features, head_epoch
from finetune.train.runtime import Runtime, autocast, predict, to_device
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

log = logging.getLogger(__name__)


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


def fit(model: nn.Module, train_loader, test_loader, cfg: TrainConfig, runtime: Runtime, out_dir: Path, *,
        fingerprint: str, checkpoint: dict | None = None, extra: dict | None = None,
        callbacks: Sequence[Callback] = (), dist: Dist = SINGLE) -> list[EpochStats]:
    """Train ``model`` for ``cfg.epochs``, continuing from ``checkpoint`` (see load_checkpoint).

    Checkpoints go to ``out_dir`` after every epoch (rank 0 only), tagged with ``fingerprint``
    (settings, data, starting weights) and holding ``extra`` (e.g. the MLflow run id).
    Each of ``callbacks`` gets every epoch's stats before its checkpoint is written (so that a
    crash in between repeats the epoch rather than losing its record), and the history at the
    end (tracking arrives this way: see finetune/train/callbacks.py). Epochs with a frozen
    backbone train the head on cached features (``cfg.cached_features``).
    """
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    freeze(model, initial_frozen(cfg))
    optimizer = make_optimizer(model, cfg)
    history = resume(checkpoint, model, optimizer, cfg) if checkpoint else []
    network, features = None, None
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        block = unfreeze_for_epoch(model, optimizer, cfg, epoch)
        if block:
            log.info("epoch %d: unfroze %s (lr %.2g)", epoch, block, cfg.lr * cfg.unfreeze_lr_mult)
            network = None  # DDP and compile must see the new set of trainable parameters
        apply_schedule(optimizer, cfg, epoch)
        if head_only(cfg, epoch):
            extracting = features is None
            if extracting:
                features = extract_features(model, train_loader, test_loader, runtime, feature_views(cfg, epoch), dist)
            stats = head_epoch(model, features, optimizer, cfg, epoch)
            stats.features_seconds = features.seconds if extracting else 0.0
        else:
            features = None  # the frozen phase is over: free the cached features
            if network is None:
                network = training_network(model, runtime, cfg, dist)
            stats = run_epoch(network, model, train_loader, test_loader, optimizer, runtime, cfg, epoch, dist)
        history.append(_report(stats, cfg))
        for callback in callbacks:
            callback.on_epoch_end(stats)
        if dist.main:
            save_checkpoint(out_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "fingerprint": fingerprint,
                "history": [asdict(s) for s in history], "rng": rng_state(), "extra": extra or {},
            })
        dist.barrier()
    for callback in callbacks:
        callback.on_fit_end(history)
    return history


def training_network(model: nn.Module, runtime: Runtime, cfg: TrainConfig, dist: Dist) -> nn.Module:
    """What the live epochs run: ``model``, wrapped in DistributedDataParallel under torchrun and
    compiled when ``cfg.compile`` says so (auto: on CUDA, where it pays for its compile time)."""
    network = model
    if dist.active:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile is True or (cfg.compile == "auto" and runtime.device.type == "cuda"):
        network = torch.compile(network)
    return network


def run_epoch(network, model, train_loader, test_loader, optimizer, runtime: Runtime, cfg: TrainConfig,
              epoch: int, dist: Dist = SINGLE) -> EpochStats:
    """Train one epoch through ``network``, evaluate ``model`` on the test loader (each process
    its share; sums over processes)."""
    lrs = group_lrs(optimizer)
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)  # DistributedSampler: a new order every epoch
    started = time.perf_counter()
    total = len(train_loader.sampler) if cfg.max_steps is None else min(
        len(train_loader.sampler), cfg.max_steps * train_loader.batch_size)
    with Progress(f"epoch {epoch}/{cfg.epochs}", total=total, unit="img") as bar:
        loss_sum, correct, seen = train_epoch(network, train_loader, optimizer, runtime, cfg, bar, dist.world)
    seconds = time.perf_counter() - started
    probs, truth = predict(model, test_loader, runtime, cfg.max_steps)
    loss_sum, correct, seen, right, tested = dist.sum(
        [loss_sum, correct, seen, (probs.argmax(1) == truth).sum().item(), len(truth)])
    return EpochStats(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), right / max(tested, 1),
                      seen / seconds, seconds, lrs)


def _report(stats: EpochStats, cfg: TrainConfig) -> EpochStats:
    """Log an epoch's one summary line; stop on a loss that is not a number."""
    log.info("epoch %d/%d: train loss %.4f, train acc %.3f, test acc %.3f, %.1f img/s, %.2f s",
             stats.epoch, cfg.epochs, stats.train_loss, stats.train_acc, stats.test_acc, stats.images_per_s,
             stats.seconds)
    if not math.isfinite(stats.train_loss):
        raise FloatingPointError(f"epoch {stats.epoch}: the training loss is {stats.train_loss}; lower train lr")
    return stats


def predict_all(model, loader, runtime: Runtime, dist: Dist = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels of the whole test set in its order, each process scoring its
    strided share (see loaders) and every process receiving all."""
    probs, truth = predict(model, loader, runtime)
    if not dist.active:
        return probs, truth
    parts = dist.gather((probs, truth))
    total = sum(len(t) for _, t in parts)
    return interleave([p for p, _ in parts], total), interleave([t for _, t in parts], total)
