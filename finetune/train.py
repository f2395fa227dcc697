"""Training: the D2L fine-tuning recipe and the Keras strategies, built from small steps.

``fit`` is the big verb, as fastai's ``fine_tune``: set the strategy's frozen blocks → build
the optimiser at discriminative rates → for each epoch: unfreeze what the plan says, train an
epoch, evaluate, report, checkpoint. A checkpoint after every epoch (written atomically) lets a
rerun after a crash resume at the next epoch with the same optimiser, schedule and RNG states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.config import TrainConfig
from finetune.data.decoded import normalize
from finetune.distributed import SINGLE, Dist, interleave
from finetune.features import extract_features, feature_views, head_epoch, head_only
from finetune.files import write_atomic
from finetune.model import BLOCKS, block_modules, freeze, param_groups, train_mode, unfreeze
from finetune.progress import Progress

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class EpochStats:
    """What one epoch measured; ``lrs`` per parameter group at the epoch's end."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    images_per_s: float
    seconds: float
    lrs: dict[str, float] = field(default_factory=dict)
    features_seconds: float = 0.0  # computing cached backbone features before this epoch (if it did)


@dataclass(frozen=True)
class Runtime:
    """Where and how the arithmetic runs, resolved from ``device``/``precision`` settings."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    channels_last: bool

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """``device: auto`` picks cuda → mps → cpu; ``precision: auto`` picks bf16 where it is fast."""
    device = pick_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        # bf16 autocast: CUDA GPUs that support it, and CPUs with native bf16 (AVX-512 bf16/AMX).
        fast_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and _cpu_has_bf16())
        precision = "bf16" if fast_bf16 else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device, dtype, cfg.channels_last)


def pick_device(name: str) -> torch.device:
    """``auto``: cuda → mps → cpu; else the named device (cpu, cuda, cuda:1, ...)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, and bf16 emulation is very slow
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def worker_count(workers: int | str) -> int:
    """DataLoader worker processes: ``auto`` leaves one core to the training process."""
    if workers == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(workers)


# --- the strategy: which blocks train, and when --------------------------------------------------


def initial_frozen(cfg: TrainConfig) -> list[str]:
    """Blocks frozen at the start: everything but the head for ``freeze`` and ``gradual``."""
    return list(BLOCKS[1:]) if cfg.strategy in ("freeze", "gradual") else []


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the trainable parameters: body at ``lr``, new head at ``lr * head_lr_mult``."""
    groups = [g | {"initial_lr": g["lr"]} for g in param_groups(model, cfg.lr, cfg.head_lr_mult)]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def schedule_factor(cfg: TrainConfig, epoch: int) -> float:
    """The lr multiplier of epoch ``epoch`` (1-based): 1, cosine (from 1 towards 0 over
    ``epochs``), or ``step_gamma`` per ``step_epochs`` epochs."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((epoch - 1) // cfg.step_epochs)
    return 1.0


def apply_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> None:
    """Set every group's lr for ``epoch``. A function of the epoch alone (not a torch scheduler,
    whose state breaks when gradual unfreezing adds groups), so a resume needs no extra state."""
    factor = schedule_factor(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def unfreeze_for_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> str | None:
    """``gradual``: at the start of epoch ``epoch`` (1-based) unfreeze the planned block and add
    it to the optimiser at ``lr * unfreeze_lr_mult`` (lower than the head's, as Keras advises)."""
    block = cfg.unfreeze.get(epoch) if cfg.strategy == "gradual" else None
    if block is None:
        return None
    unfreeze(model, [block])
    params = [p for p in _block_params(model, block) if p.requires_grad]
    lr = cfg.lr * cfg.unfreeze_lr_mult
    optimizer.add_param_group({"name": block, "params": params, "lr": lr, "initial_lr": lr})
    return block


def _block_params(model: nn.Module, block: str) -> list[nn.Parameter]:
    return [p for module in block_modules(model, block) for p in module.parameters()]


# --- one epoch -----------------------------------------------------------------------------------


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
        images, labels = _to_device(images, labels, runtime)
        with _autocast(runtime):
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


@torch.inference_mode()
def predict(model, loader, runtime: Runtime, max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and true labels over ``loader`` (evaluation mode)."""
    model.eval()
    probs, truth = [], []
    for step, (images, labels) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images, _ = _to_device(images, labels, runtime)
        with _autocast(runtime):
            logits = model(images)
        probs.append(logits.float().softmax(1).cpu())
        truth.append(labels)
    return torch.cat(probs), torch.cat(truth)


def _to_device(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime):
    images = images.to(runtime.device, non_blocking=True)
    if runtime.channels_last:  # before normalising: copying uint8 moves a quarter of the bytes
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:  # from the decode cache; the result keeps channels_last
        images = normalize(images)
    return images, labels.to(runtime.device, non_blocking=True)


def _autocast(runtime: Runtime):
    if runtime.dtype is None:
        return nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.dtype)


# --- the whole fit, with checkpoints -------------------------------------------------------------


def fit(model: nn.Module, train_loader, test_loader, cfg: TrainConfig, runtime: Runtime, out_dir: Path, *,
        fingerprint: str, checkpoint: dict | None = None, extra: dict | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None, dist: Dist = SINGLE) -> list[EpochStats]:
    """Train ``model`` for ``cfg.epochs``, continuing from ``checkpoint`` (see load_checkpoint).

    Checkpoints go to ``out_dir`` after every epoch (rank 0 only), tagged with ``fingerprint``
    (settings, data, starting weights) and holding ``extra`` (e.g. the MLflow run id).
    ``on_epoch`` is called with each epoch's stats before its checkpoint is written, so that a
    crash in between repeats the epoch rather than losing its record. Epochs with a frozen
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
        if on_epoch is not None:
            on_epoch(stats)
        if dist.main:
            save_checkpoint(out_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "fingerprint": fingerprint,
                "history": [asdict(s) for s in history], "rng": rng_state(), "extra": extra or {},
            })
        dist.barrier()
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


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's current lr, by group name."""
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


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


def fingerprint_of(*parts: object) -> str:
    """A short digest of JSON-able settings: equal settings, equal fingerprint."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically: a kill mid-write leaves the previous one."""
    write_atomic(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(out_dir: Path, fingerprint: str) -> dict | None:
    """The checkpoint in ``out_dir`` if it belongs to this run (same fingerprint), else None."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    # Our own file, with RNG states (numpy arrays) that weights_only loading refuses.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it belongs to other settings or data", path)
        return None
    return state


def resume(state: dict, model, optimizer, cfg: TrainConfig) -> list[EpochStats]:
    """Restore model, optimiser and RNGs from a checkpoint; return the history so far."""
    for epoch in range(2, state["epoch"] + 1):  # the optimiser must have the same groups again
        unfreeze_for_epoch(model, optimizer, cfg, epoch)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log.info("resuming: epoch %d of %d done", state["epoch"], cfg.epochs)
    return [EpochStats(**s) for s in state["history"]]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
