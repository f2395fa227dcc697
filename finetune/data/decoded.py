"""Decode once: every image decoded and resized a single time into memory-mapped uint8 arrays.

A cache folder holds one dataset version at one set of sizes (its name is a digest of both):

- ``train.u8`` + ``train.idx.npy``: the train images, shorter side reduced to ``short_side``
  (never enlarged), aspect ratio kept, HWC uint8 one after another; the index holds each one's
  offset, height and width. RandomResizedCrop picks its box relative to the image's area and
  aspect ratio, so cropping these gives the same distribution of crops as the originals.
- ``test.npy``: the test images after the recipe's deterministic test transform (resize, center
  crop) as (N, crop, crop, 3), since nothing random happens to them; added only when something
  that evaluates (the study, ``test_each_epoch``) first asks for it.

Train-time augmentation of these images is finetune/train/augment.py's; the evaluation transform
(finetune/data/portable.py) gives validation its crops of the stored train images.

Everything is written to a temporary name and renamed into place, so a reader sees a whole
cache (or test part) or none; arrays are memory-mapped, so a dataset bigger than RAM still works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.data.images import FileListDataset
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD, eval_crop, load_image

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout of a cache folder changes


@dataclass(frozen=True)
class Sizes:
    """The sizes a cache is built for: train shorter side, and the test transform."""

    short_side: int
    test_resize: int
    test_crop: int
    resize_mode: str

    def eval_crop(self) -> v2.Compose:
        """The evaluation transform's geometry at these sizes (portable.eval_crop): what makes the
        cached test images, and validation's crops of the stored train images."""
        return eval_crop(self.test_resize, self.test_crop, self.resize_mode)


def cache_key(train: FileListDataset, test: FileListDataset, sizes: Sizes, data_version: str) -> str:
    """A digest of the data (DVC version, every file's path, label, size and mtime) and sizes."""
    digest = hashlib.sha256(json.dumps([FORMAT, data_version, sizes.__dict__]).encode())
    for dataset in (train, test):
        for path, label in zip(dataset.paths, dataset.labels, strict=True):
            stat = (dataset.root / path).stat()
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{data_version[:12]}-{digest.hexdigest()[:16]}"


def ensure_cache(folder: Path, train: FileListDataset, test: FileListDataset, sizes: Sizes, workers: int,
                 with_test: bool = True) -> Path:
    """The cache at ``folder``, built first if it is not there (or was left half-written); its
    test part only ``with_test`` (a training decodes the train split alone: only evaluation
    reads the test split), added on the first call that asks for it."""
    if not (folder / "meta.json").exists():
        _build_train_part(folder, train, sizes, workers)
    if with_test and not (folder / "test.npy").exists():
        started = time.perf_counter()
        tmp = folder / f".test-{os.getpid()}.npy"
        try:
            _write_test(tmp, test, sizes, workers)
            os.replace(tmp, folder / "test.npy")  # another process writing the same: either is whole
        finally:
            tmp.unlink(missing_ok=True)
        log.info("decoded %d test images once into %s (%.1f s)", len(test), folder, time.perf_counter() - started)
    return folder


def _build_train_part(folder: Path, train: FileListDataset, sizes: Sizes, workers: int) -> None:
    """train.u8, train.idx.npy and meta.json, written in a staging folder renamed into place."""
    started = time.perf_counter()
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_train(staging, train, sizes.short_side, workers)
        meta = {"format": FORMAT, "sizes": sizes.__dict__, "train": len(train),
                "seconds": round(time.perf_counter() - started, 2)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same cache first: theirs is as good
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("decoded %d train images once into %s (%.1f s)", len(train), folder, time.perf_counter() - started)


def shrink(image: Image.Image, short_side: int) -> np.ndarray:
    """HWC uint8 of ``image`` with its shorter side reduced to ``short_side`` (never enlarged)."""
    width, height = image.size
    scale = short_side / min(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def _decode_train(args: tuple[Path, int]) -> np.ndarray:
    path, short_side = args
    return shrink(load_image(path), short_side)


def _decode_test(args: tuple[Path, Sizes]) -> np.ndarray:
    path, sizes = args
    return np.asarray(sizes.eval_crop()(load_image(path)), dtype=np.uint8)


def _decoded(function, jobs: list, workers: int):
    """``function`` over ``jobs`` in order, in ``workers`` processes (0: in this one)."""
    if workers <= 0 or len(jobs) < 2:
        yield from map(function, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(function, jobs, chunksize=16)


def _write_train(folder: Path, dataset: FileListDataset, short_side: int, workers: int) -> None:
    index = np.zeros((len(dataset), 3), dtype=np.int64)  # offset, height, width
    offset = 0
    with open(folder / "train.u8", "wb") as out:
        jobs = [(dataset.root / p, short_side) for p in dataset.paths]
        for i, array in enumerate(_decoded(_decode_train, jobs, workers)):
            out.write(array.tobytes())
            index[i] = (offset, array.shape[0], array.shape[1])
            offset += array.size
    np.save(folder / "train.idx.npy", index)


def _write_test(path: Path, dataset: FileListDataset, sizes: Sizes, workers: int) -> None:
    shape = (len(dataset), sizes.test_crop, sizes.test_crop, 3)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    jobs = [(dataset.root / p, sizes) for p in dataset.paths]
    for i, image in enumerate(_decoded(_decode_test, jobs, workers)):
        array[i] = image
    array.flush()
    del array


class DecodedDataset(torch.utils.data.Dataset):
    """(uint8 CHW tensor, label) from a cache folder; ``transform`` works on uint8 tensors.

    The arrays are opened lazily in each process (a DataLoader worker maps the file itself
    instead of receiving a pickled copy of the data).
    """

    def __init__(self, folder: Path, split: str, labels: list[int], transform=None) -> None:
        self.folder, self.split, self.labels, self.transform = Path(folder), split, labels, transform
        self._data = self._index = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_data": None, "_index": None}

    def _open(self) -> None:
        if self.split == "train":
            self._data = np.memmap(self.folder / "train.u8", dtype=np.uint8, mode="r")
            self._index = np.load(self.folder / "train.idx.npy")
        else:
            self._data = np.load(self.folder / "test.npy", mmap_mode="r")

    def image(self, index: int) -> np.ndarray:
        """The stored HWC uint8 array of item ``index``."""
        if self._data is None:
            self._open()
        if self.split != "train":
            return np.asarray(self._data[index])
        offset, height, width = self._index[index]
        return np.asarray(self._data[offset:offset + height * width * 3]).reshape(height, width, 3)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.image(index).copy()).permute(2, 0, 1)
        return (self.transform(image) if self.transform else image), self.labels[index]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float, scaled to [0, 1] and normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255)
    return images.float().sub_(mean).mul_(scale)  # (x / 255 - mean) / std, in one new tensor
