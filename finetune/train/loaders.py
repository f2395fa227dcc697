"""Data loaders for training: the validated file list, through the decode cache when it is on,
shared out across processes under torchrun."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache
from finetune.data.images import FileListDataset, load_splits
from finetune.data.lineage import data_version
from finetune.data.portable import eval_transform
from finetune.train.augment import CropDataset, augment_where, tensor_train_transform, train_transform
from finetune.train.distributed import SINGLE, Dist
from finetune.train.recipe import fit_recipe
from finetune.train.runtime import pick_device, worker_count
from finetune.train.subsets import split_validation

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import Params, TrainConfig


@dataclass(frozen=True)
class Loaders:
    """What a training reads: train (shuffled, augmented), validation (the held-out share of the
    train split, test transform; None when ``val_fraction`` is 0), test (None unless asked for:
    only evaluation reads it), the class names, and which files were held out."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    classes: list[str]
    val_files: list[tuple[str, str]]  # (path, class) of each validation image
    val_set: Dataset  # all validation images in their order (under torchrun the loader reads a share)
    train_images: int
    crop: int = 0  # model.train_crop (what a compiled graph depends on)
    cache_dir: Path | None = None  # <project>/<cache.dir>: the decode cache and the persistent inductor cache
    cfg: TrainConfig | None = None  # the recipe fitted to train_images (batch_size / epochs: auto resolved)
    probe: DataLoader | None = None  # without validation: the train images, test transform (collapse check)


def loaders(params: Params, cfg: TrainConfig, root: Path, files_csv: Path, pin: bool, project: Path = Path("."),
            dist: Dist = SINGLE, *, key: str = "train.val_fraction", test: bool = False,
            subset: Callable[[list[int], list[int]], list[int]] | None = None,
            split: tuple[list[int], list[int]] | None = None) -> Loaders:
    """Loaders over the file list of ``root`` (see :class:`Loaders`); ``cfg.val_fraction`` of
    each class is held out by ``cfg.seed`` (``key`` names that setting in errors), and
    ``subset(labels, train_indices)`` may narrow what trains (the study's fractions), and
    ``split`` (train, validation indices into the train list) replaces the held-out share (the
    search's cross-validation folds, finetune/train/subsets.py). The recipe
    fitted to the images that train (finetune/train/recipe.py) is ``Loaders.cfg``: train with it.

    With ``cfg.decode_cache`` they read the decode cache (built here first if missing). Under
    torchrun each process gets a DistributedSampler share of train and the strided share
    ``rank, rank + world, ...`` of validation and test, and ``batch_size / world`` images per step."""
    m = params.model
    train_files, test_ds, classes = load_splits(
        root, files_csv, train_transform(m.train_crop), eval_transform(m.test_resize, m.test_crop, m.resize_mode))
    train_idx, val_idx = split or split_validation(train_files.labels, cfg.val_fraction, cfg.seed, classes, key)
    if subset is not None:
        train_idx = subset(train_files.labels, train_idx)
    cfg = fit_recipe(cfg, len(train_idx), key.rsplit(".", 1)[0])
    # Which augmentation path runs (PIL, cache or device): the table of finetune/train/augment.py.
    crops = None  # augment_on device: workers slice boxes, to_device crops them
    if cfg.decode_cache:
        train_ds, val_ds, test_ds = decoded_splits(params, train_files, test_ds, project, dist, test)
        if augment_where(cfg.augment_on, cfg.decode_cache, pick_device(cfg.device).type) == "device":
            train_ds = crops = CropDataset(train_ds, m.train_crop)
    else:
        train_ds = train_files
        val_ds = FileListDataset(root, train_files.paths, train_files.labels,
                                 eval_transform(m.test_resize, m.test_crop, m.resize_mode))
    workers = worker_count(cfg.workers)
    options = {"batch_size": max(1, cfg.batch_size // dist.world), "num_workers": workers, "pin_memory": pin,
               "persistent_workers": workers > 0}
    train_ds = Subset(train_ds, train_idx)
    train_options = options | ({"collate_fn": crops.collate} if crops is not None else {})
    if dist.active:
        train = DataLoader(train_ds, sampler=DistributedSampler(train_ds, dist.world, dist.rank, shuffle=True,
                                                                seed=cfg.seed), **train_options)
    else:
        train = DataLoader(train_ds, shuffle=True, **train_options)
    # A short pass: starting workers would cost more (and persistent workers need workers).
    watch = {"num_workers": 0, "persistent_workers": False} if workers else {}
    val = DataLoader(Subset(val_ds, val_idx[dist.rank::dist.world]), **(options | watch)) if val_idx else None
    test_loader = DataLoader(Subset(test_ds, range(dist.rank, len(test_ds), dist.world)),
                             **(options | watch)) if test else None
    probe = None if val_idx else DataLoader(Subset(val_ds, train_idx[dist.rank::dist.world]), **(options | watch))
    val_files = [(train_files.paths[i], classes[train_files.labels[i]]) for i in val_idx]
    return Loaders(train, val, test_loader, classes, val_files, Subset(val_ds, val_idx), len(train_idx),
                   m.train_crop, project / params.cache.dir, cfg, probe)


def decoded_splits(params: Params, train_ds, test_ds, project: Path, dist: Dist = SINGLE, with_test: bool = False):
    """Train (augmenting), validation (the train images with the test transform) and test
    datasets read from the decode cache (each machine's local rank 0 builds it if missing; its test part only
    ``with_test``, else the test dataset is None)."""
    m = params.model
    sizes = Sizes(params.cache.short_side or m.test_resize, m.test_resize, m.test_crop, m.resize_mode)
    version = data_version(project, Path(os.path.relpath(train_ds.root, project)))
    folder = project / params.cache.dir / cache_key(train_ds, test_ds, sizes, version)
    # The first process of each machine builds it (nodes need not share a folder; where they do,
    # the build is atomic and a second builder's rename finds the first one's cache in place).
    if dist.local_rank == 0:
        workers = (os.cpu_count() or 1) if params.cache.workers == "auto" else params.cache.workers
        ensure_cache(folder, train_ds, test_ds, sizes, workers, with_test)
    dist.barrier()
    return (DecodedDataset(folder, "train", train_ds.labels, tensor_train_transform(m.train_crop)),
            DecodedDataset(folder, "train", train_ds.labels, sizes.eval_crop()),
            DecodedDataset(folder, "test", test_ds.labels) if with_test else None)
