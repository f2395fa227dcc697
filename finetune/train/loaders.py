"""Data loaders for training: the validated file list, through the decode cache when it is on,
shared out across processes under torchrun."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler, Subset

from finetune.config import Params, TrainConfig
from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache, tensor_train_transform
from finetune.data.images import eval_transform, load_splits, train_transform
from finetune.data.lineage import data_version
from finetune.train.distributed import SINGLE, Dist
from finetune.train.runtime import worker_count


def loaders(params: Params, cfg: TrainConfig, root: Path, files_csv: Path, pin: bool, project: Path = Path("."),
            dist: Dist = SINGLE):
    """Train (shuffled, augmented) and test loaders over the file list of ``root``; the classes.

    With ``cfg.decode_cache`` they read the decode cache (built here first if missing). Under
    torchrun each process gets a DistributedSampler share of train and the strided share
    ``rank, rank + world, ...`` of test, and ``batch_size / world`` images per step."""
    m = params.model
    train_ds, test_ds, classes = load_splits(
        root, files_csv, train_transform(m.train_crop), eval_transform(m.test_resize, m.test_crop, m.resize_mode))
    if cfg.decode_cache:
        train_ds, test_ds = decoded_splits(params, train_ds, test_ds, project, dist)
    workers = worker_count(cfg.workers)
    options = {"batch_size": max(1, cfg.batch_size // dist.world), "num_workers": workers, "pin_memory": pin,
               "persistent_workers": workers > 0}
    if not dist.active:
        return DataLoader(train_ds, shuffle=True, **options), DataLoader(test_ds, shuffle=False, **options), classes
    sampler = DistributedSampler(train_ds, dist.world, dist.rank, shuffle=True, seed=cfg.seed)
    test_share = Subset(test_ds, range(dist.rank, len(test_ds), dist.world))
    return DataLoader(train_ds, sampler=sampler, **options), DataLoader(test_share, **options), classes


def decoded_splits(params: Params, train_ds, test_ds, project: Path, dist: Dist = SINGLE):
    """The train and test datasets read from the decode cache (rank 0 builds it if missing)."""
    m = params.model
    sizes = Sizes(params.cache.short_side or m.test_resize, m.test_resize, m.test_crop, m.resize_mode)
    version = data_version(project, Path(os.path.relpath(train_ds.root, project)))
    folder = project / params.cache.dir / cache_key(train_ds, test_ds, sizes, version)
    if dist.main:
        workers = (os.cpu_count() or 1) if params.cache.workers == "auto" else params.cache.workers
        ensure_cache(folder, train_ds, test_ds, sizes, workers)
    dist.barrier()
    return (DecodedDataset(folder, "train", train_ds.labels, tensor_train_transform(m.train_crop)),
            DecodedDataset(folder, "test", test_ds.labels))


def full_dataset(loader: DataLoader):
    """The whole dataset behind ``loader`` (under torchrun the test loader reads a Subset)."""
    dataset = loader.dataset
    return dataset.dataset if isinstance(dataset, Subset) else dataset
