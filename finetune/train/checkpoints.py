"""Checkpoints: one file per training folder, written after the last epoch and after any epoch
that ends ``checkpoint_every_s`` or more after the previous checkpoint (0: after every epoch), so
a rerun after a crash resumes after that epoch with the same weights, optimiser, history and RNG
states."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.core.files import write_atomic
from finetune.train.callbacks import EpochStats
from finetune.train.selection import Selection
from finetune.train.strategy import unfreeze_for_epoch

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
SET_ASIDE = "set-aside"  # models/set-aside/<variant>: unreadable checkpoints, outside every DVC output


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically: a kill mid-write leaves the previous one."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: a full disk then raises OSError, not torch's own error
            torch.save(state, f)

    write_atomic(out_dir / CHECKPOINT, write)


class CheckpointWriter:
    """Writes a training's checkpoints in a background thread while the next epoch trains, when
    :meth:`due` says an epoch is to be checkpointed.

    Writing ResNet-18's checkpoint (weights, optimiser state and the best weights so far: 134 MB)
    took a quarter of a second per epoch on a 2-core laptop CPU, all of it waiting for the disk.
    The live tensors (``LIVE`` keys) are copied first, since the next epoch changes them in
    place; one write is in flight at a time, and :meth:`wait` (at the end of a training, or
    before the next write) raises the error of a failed one. A kill during a write leaves the
    previous checkpoint (see save_checkpoint): the rerun resumes from that one."""

    LIVE = ("model", "optimizer")

    def __init__(self, out_dir: Path, every_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.out_dir = out_dir
        self.every_s = every_s
        self._clock = clock
        self._last = clock()  # the training's start counts as the last checkpoint
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def due(self, final: bool) -> bool:
        """Whether the epoch that just ended is checkpointed: the ``final`` one always (the outputs
        are made from it, and a crash before they are recorded must not train it again), any
        other once ``every_s`` have passed since the last checkpoint (0: every epoch). Copying and
        writing 134 MB took 70 ms per epoch on a 2-core CPU: a tenth of the demo's 0.8 s epochs."""
        return final or self._clock() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Start writing ``state`` (after the previous write has ended)."""
        self.wait()
        self._last = self._clock()
        snapshot = state | {key: detached_copy(state[key]) for key in self.LIVE if key in state}
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="finetune-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _write(self, snapshot: dict) -> None:
        try:
            save_checkpoint(self.out_dir, snapshot)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight has ended; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def detached_copy(value):
    """``value`` (a state dict: nested dicts and lists of tensors and plain values) with every
    tensor copied to the CPU, detached from the training's live tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: detached_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_copy(v) for v in value)
    return value


def remove_checkpoint(out_dir: Path) -> None:
    """Delete ``out_dir``'s checkpoint once its training is complete and recorded so: a complete
    run is never resumed (the next training of the same settings starts afresh), so the file
    would only cost DVC hashing, caching and pushing it (134 MB for ResNet-18) with every run."""
    (out_dir / CHECKPOINT).unlink(missing_ok=True)


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


def set_aside_folder(out_dir: Path) -> Path:
    """Where unreadable checkpoints of ``out_dir`` (models/<variant>) are kept: models/set-aside/<variant>,
    outside the DVC output, so that they are neither cached nor pushed with the model."""
    return out_dir.parent / SET_ASIDE / out_dir.name


def set_aside(path: Path, err: Exception) -> Path:
    """Move an unreadable checkpoint to ``set_aside_folder``/``<name>.corrupt-<time>`` (kept for a
    look); its new path, which the warning names."""
    folder = set_aside_folder(path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    aside = folder / f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(path, aside)  # the same file system: models/ holds both
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


def stored_for_watchers(state: dict | None) -> tuple[dict, list[EpochStats]]:
    """What a checkpoint hands back to whoever watches its training (a tracking record): the
    ``extra`` its training was saved with (e.g. the record's resume token) and the epochs so
    far; ``({}, [])`` without a checkpoint."""
    if not state:
        return {}, []
    return dict(state.get("extra") or {}), [EpochStats(**s) for s in state["history"]]


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
