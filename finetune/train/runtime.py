"""Where and how the arithmetic runs: device, precision, memory layout, seeds, loader workers;
and inference over a loader (training and evaluation alike)."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.data.decoded import normalize
from finetune.train.augment import CropBatch, augment_batch

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig


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
            device.type == "cpu" and cpu_has_bf16())
        precision = "bf16" if fast_bf16 else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Runtime(device, dtype, cfg.channels_last)


def pick_device(name: str) -> torch.device:
    """``auto``: cuda → mps → cpu; else the named device (cpu, cuda, cuda:1, ...)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def cpu_has_bf16() -> bool:
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


def to_device(images: torch.Tensor | CropBatch, labels: torch.Tensor, runtime: Runtime):
    """A batch on the runtime's device, in its memory layout, uint8 images normalised there (a
    :class:`CropBatch` cropped, resized and flipped there first: augment_on device)."""
    if isinstance(images, CropBatch):
        images = augment_batch(images, runtime.device)  # float, normalised
    else:
        images = images.to(runtime.device, non_blocking=True)
    if runtime.channels_last:  # before normalising: copying uint8 moves a quarter of the bytes
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:  # from the decode cache; the result keeps channels_last
        images = normalize(images)
    return images, labels.to(runtime.device, non_blocking=True)


def autocast(runtime: Runtime):
    """The runtime's autocast context (none for fp32)."""
    if runtime.dtype is None:
        return nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.dtype)


@torch.inference_mode()
def predict(model, loader, runtime: Runtime, max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and true labels over ``loader`` (evaluation mode)."""
    model.eval()
    probs, truth = [], []
    for step, (images, labels) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images, _ = to_device(images, labels, runtime)
        with autocast(runtime):
            logits = model(images)
        probs.append(logits.float().softmax(1).cpu())
        truth.append(labels)
    return torch.cat(probs), torch.cat(truth)
