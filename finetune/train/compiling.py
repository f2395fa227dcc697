"""Compile when it pays: ``compile: auto`` compiles only when the planned work repays the compile.

The rule, from the issue-13 measurements on an NVIDIA H200 (ResNet-18, 224 px, batch 128, bf16,
channels_last, data already on the GPU, torch 2.11):

- a bare training step runs at 12,057 img/s eager and 15,961 img/s compiled, so compiling
  saves ``1/12,057 - 1/15,961`` = 20.3 µs per training image;
- a cold compile (empty inductor cache) cost 28-60 s: counted as 45 s;
- a warm compile (the same graphs found in the persistent inductor cache) is *estimated* at
  8 s (Dynamo still traces; inductor's FX-graph and AOT-autograd caches skip code generation
  and autotuning); a marker written after a compile says the cache is warm for that shape.

So auto compiles when ``planned_images x 20.3 µs > compile seconds``: from about 2.2 million
planned training images cold (e.g. ImageNet-1k for 2 epochs), 394,000 warm. A hot-dog-sized
training (about 1,800 train images x 5 epochs = 9,000) never compiles. Not on CUDA, auto never
compiles: on the 2-core CPU compiling took 48 s and ran no faster (docs/speed.md). Inference
(evaluation) counts a forward pass as a third of a training step, so it needs 3x the images.
``compile: true`` / ``false`` force either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

EAGER_IMG_S = 12_057  # H200, bare bf16 training step, eager
COMPILED_IMG_S = 15_961  # the same step under torch.compile
SAVED_S_PER_IMAGE = 1 / EAGER_IMG_S - 1 / COMPILED_IMG_S  # 20.3 µs
COLD_COMPILE_S = 45.0  # measured 28-60 s with an empty cache
WARM_COMPILE_S = 8.0  # an estimate, not a measurement: graphs from the persistent inductor cache
INFERENCE_SHARE = 1 / 3  # a forward pass is about a third of a training step (forward + backward)


def break_even(warm: bool, share: float = 1.0) -> int:
    """Planned images from which compiling repays its cost."""
    return math.ceil((WARM_COMPILE_S if warm else COLD_COMPILE_S) / (SAVED_S_PER_IMAGE * share))


def should_compile(planned_images: int, device_type: str, warm: bool, share: float = 1.0) -> tuple[bool, str]:
    """``compile: auto``'s decision and its reason: compile on CUDA when ``planned_images`` (the
    images this process will train on, or score with ``share=INFERENCE_SHARE``) save more time
    than the compile costs (cold, or ``warm`` from the persistent inductor cache)."""
    if device_type != "cuda":
        return False, f"compile: auto does not compile on {device_type} (compiling costs more than it saves there)"
    cost = WARM_COMPILE_S if warm else COLD_COMPILE_S
    saved = planned_images * SAVED_S_PER_IMAGE * share
    state = "warm (cached)" if warm else "cold"
    verdict = "repay" if saved > cost else "would not repay"
    reason = (f"compile: auto: {planned_images:,} planned images save about {saved:.1f} s, which {verdict} a {state} "
              f"compile of about {cost:.0f} s (break-even {break_even(warm, share):,} images)")
    return saved > cost, reason


def compile_decision(setting: bool | str, planned_images: int, device_type: str, warm: bool,
                     share: float = 1.0) -> tuple[bool, str]:
    """``compile:`` true / false as set; ``auto`` by :func:`should_compile`."""
    if setting is True or setting is False:
        return setting, f"compile: {str(setting).lower()} (set in params.yaml)"
    return should_compile(planned_images, device_type, warm, share)


def use_persistent_cache(cache_dir: Path) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd) at ``<cache_dir>/inductor``,
    so that a later run compiling the same shapes finds them; call before the first compile."""
    folder = (Path(cache_dir) / "inductor").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    return folder


def compile_key(model: torch.nn.Module, crop: int, batch_size: int, dtype: torch.dtype | None,
                channels_last: bool) -> str:
    """What a compiled graph depends on here: architecture (class and parameter count, trainable
    count: unfreezing changes the graph), crop, batch size, precision, layout, torch version."""
    params = list(model.parameters())
    arch = [type(model).__name__, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)]
    text = json.dumps([arch, crop, batch_size, str(dtype), channels_last, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def marker(cache_dir: Path, key: str) -> Path:
    """The file saying that graphs of ``key`` were compiled into ``<cache_dir>/inductor``."""
    return Path(cache_dir) / "inductor" / f"finetune-compiled-{key}.json"


def is_warm(cache_dir: Path | None, key: str) -> bool:
    """Whether a run has compiled graphs of ``key`` into the persistent cache before."""
    return cache_dir is not None and marker(cache_dir, key).exists()


def mark_after_first_step(network: torch.nn.Module, cache_dir: Path, key: str) -> None:
    """Write the marker of ``key`` when ``network`` is called the second time: by then the first
    step's forward and backward graphs have been compiled (and cached)."""
    calls = []

    def hook(module, args) -> None:
        calls.append(1)
        if len(calls) == 2:
            path = marker(cache_dir, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "torch": torch.__version__}) + "\n")
            handle.remove()

    handle = network.register_forward_pre_hook(hook)


def planned_images(train_images: int, epochs_left: int, batch_size: int, max_steps: int | None, world: int = 1) -> int:
    """The images one process will train on: its share of the train split (``max_steps`` batches
    at most) times the epochs left."""
    per_epoch = math.ceil(train_images / world)
    if max_steps is not None:
        per_epoch = min(per_epoch, max_steps * max(1, batch_size // world))
    return per_epoch * max(0, epochs_left)
