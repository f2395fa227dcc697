"""Cached features for frozen work: the head trains on backbone outputs computed once.

Under ``strategy: freeze`` (and in the frozen epochs of ``gradual``) nothing below the head
learns and every frozen module runs in inference mode, so the backbone maps an image view to
the same features in every epoch. They are computed once per image and view (``feature_views``
random augmented views of each train image; the one view of each validation image), and each
head epoch is a pass of the network's top over a view's features: milliseconds instead of a pass
of the whole network. What is backbone and what is top comes from the network's row of ARCHS
(a ResNet's top is its output layer ``fc``; a MobileNet's or EfficientNet's, its ``classifier``,
whose dropout and frozen hidden layer run in each head epoch as they would live). Epoch ``e``
reads view ``(e - 1) mod views``, so with as many views as frozen epochs every epoch sees fresh
augmentations, exactly as the live recipe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from finetune.model.factory import top_of, top_removed
from finetune.train.callbacks import EpochStats
from finetune.train.distributed import Dist
from finetune.train.health import predicted_classes
from finetune.train.runtime import Runtime, autocast, to_device
from finetune.train.strategy import group_lrs, train_mode

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Backbone outputs: one (features, labels) pair per train view, and one per watched split
    (``val``; ``test`` when each epoch scores it)."""

    train: list[tuple[torch.Tensor, torch.Tensor]]
    watched: dict[str, tuple[torch.Tensor, torch.Tensor]]
    seconds: float


def backbone(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's features of ``images``: the input of the network's top (see ARCHS)."""
    with top_removed(model):
        return model(images)


@torch.inference_mode()
def _features(model, loader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, labels = [], []
    for images, truth in loader:
        images, truth = to_device(images, truth, runtime)
        with autocast(runtime):
            outputs.append(backbone(model, images).float())
        labels.append(truth)
    return torch.cat(outputs), torch.cat(labels)


def extract_features(model, train_loader, watched: dict, runtime: Runtime, views: int, dist: Dist) -> Features:
    """Features of ``views`` passes over the (augmenting) train loader and one over each loader
    of ``watched`` (name → loader or None); under torchrun each process computes its share and
    every process gets them all."""
    started = time.perf_counter()
    model.eval()  # the backbone is frozen: BatchNorm uses its stored statistics, as in training
    train = []
    for view in range(views):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(10_000 + view)
        train.append(_everyone(_features(model, train_loader, runtime), dist))
    watched = {name: _everyone(_features(model, loader, runtime), dist)
               for name, loader in watched.items() if loader is not None}
    seconds = time.perf_counter() - started
    log.info("cached backbone features: %d train view(s) of %d images, %s (%.2f s)", views, len(train[0][1]),
             ", ".join(f"{len(y)} {name} images" for name, (_, y) in watched.items()) or "nothing watched", seconds)
    return Features(train, watched, seconds)


def _everyone(pair: tuple[torch.Tensor, torch.Tensor], dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    if not dist.active:
        return pair
    parts = dist.gather((pair[0].cpu(), pair[1].cpu()))
    device = pair[0].device
    return torch.cat([f for f, _ in parts]).to(device), torch.cat([y for _, y in parts]).to(device)


def head_epoch(model, features: Features, optimizer, cfg: TrainConfig, epoch: int):
    """One epoch of the network's top (the output layer and what precedes it there) over the
    cached features of view ``(epoch - 1) mod views``, then its loss and accuracy on the cached
    features of each watched split. Every process computes the same."""
    lrs = group_lrs(optimizer)
    inputs, labels = features.train[(epoch - 1) % len(features.train)]
    loss_fn = nn.CrossEntropyLoss(reduction=cfg.loss)
    # The same order in every process (torchrun): a generator of its own, seeded by the epoch.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    started = time.perf_counter()
    top = top_of(model)
    train_mode(top)
    total_loss, correct, seen = 0.0, 0, 0
    for step, first in enumerate(range(0, len(labels), cfg.batch_size)):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        batch = order[first:first + cfg.batch_size].to(inputs.device)
        logits = top(inputs[batch])
        loss = loss_fn(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * (len(batch) if cfg.loss == "mean" else 1)
        correct += (logits.argmax(1) == labels[batch]).sum().item()
        seen += len(batch)
    seconds = time.perf_counter() - started
    scores = {}
    top.eval()  # scored as the live model is: no dropout
    with torch.inference_mode():
        for name, (inputs, labels) in features.watched.items():
            probs = top(inputs).float().softmax(1)
            loss_sum, right, n = split_scores(probs, labels)
            scores |= {f"{name}_loss": loss_sum / max(n, 1), f"{name}_acc": right / max(n, 1)}
            if name == "val":
                scores["val_classes"] = int((predicted_classes(probs) > 0).sum())
    scores.pop("test_loss", None)
    return EpochStats(epoch, total_loss / max(seen, 1), correct / max(seen, 1), seen / max(seconds, 1e-9), seconds,
                      lrs, **scores)


def split_scores(probs: torch.Tensor, truth: torch.Tensor) -> tuple[float, int, int]:
    """(summed cross-entropy, images right, images) of class probabilities against labels."""
    truth = truth.to(probs.device)
    picked = probs.gather(1, truth.view(-1, 1)).clamp_min(1e-12)
    return float(-picked.log().sum()), int((probs.argmax(1) == truth).sum()), len(truth)
