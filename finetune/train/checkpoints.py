"""Checkpoints: one file per training folder, written after every epoch, so a rerun after a crash
resumes at the next epoch with the same weights, optimiser, history and RNG states."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.files import write_atomic
from finetune.train.callbacks import EpochStats
from finetune.train.selection import Selection
from finetune.train.strategy import unfreeze_for_epoch

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.config import TrainConfig

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically: a kill mid-write leaves the previous one."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: a full disk then raises OSError, not torch's own error
            torch.save(state, f)

    write_atomic(out_dir / CHECKPOINT, write)


def load_checkpoint(out_dir: Path, fingerprint: str) -> dict | None:
    """The checkpoint in ``out_dir`` if it belongs to this run (same fingerprint), else None.

    An unreadable one (truncated, overwritten) is renamed aside with a warning, and training
    starts again from its beginning: the file is written whole or not at all, so there is no
    older good state of this run to fall back to."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        # Our own file, with RNG states (numpy arrays) that weights_only loading refuses.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "history", "rng"} <= state.keys():
            raise ValueError("not a checkpoint of this project")
    except OSError:
        raise  # unreadable for another reason (permissions): not the file's fault
    except Exception as err:  # noqa: BLE001 - torch, zipfile and pickle each raise their own
        set_aside(path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it belongs to other settings or data", path)
        return None
    return state


def set_aside(path: Path, err: Exception) -> Path:
    """Rename an unreadable checkpoint to ``<name>.corrupt-<time>`` (kept for a look); its new path."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.warning("%s is unreadable (%s: %s): moved it to %s and training starts again from epoch 1; "
                "delete that file when you no longer need it", path, type(err).__name__,
                str(err).split(". ")[0][:200], aside)
    return aside


def resume(state: dict, model, optimizer, cfg: TrainConfig, selection: Selection | None = None) -> list[EpochStats]:
    """Restore model, optimiser, selection (best epoch so far) and RNGs from a checkpoint;
    return the history so far."""
    for epoch in range(2, state["epoch"] + 1):  # the optimiser must have the same groups again
        unfreeze_for_epoch(model, optimizer, cfg, epoch)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if selection is not None and "selection" in state:
        selection.load_state_dict(state["selection"])
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
