"""The decode cache: built once, exact test crops, train images shrunk with their aspect ratio,
memory-mapped reads, rebuilt when the data changes. (Its train augmentation, which draws the
recipe's crops: tests/train/test_augment.py.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from images import photo
from torchvision import transforms

from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache, normalize, shrink
from finetune.data.images import FileListDataset
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD, load_image
from finetune.train.augment import tensor_train_transform

SIZES = [(90, 40), (40, 90), (64, 64), (20, 30)]


def dataset(tmp_path: Path, split: str) -> FileListDataset:
    root = tmp_path / "data"
    paths = []
    for i, size in enumerate(SIZES):
        path = root / split / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(i + (10 if split == "test" else 0), size).save(path)
        paths.append(path.relative_to(root).as_posix())
    return FileListDataset(root, paths, [i % 2 for i in range(len(SIZES))], None)


@pytest.mark.parametrize("mode", ["squash", "aspect"])
@pytest.mark.parametrize("workers", [0, 2])
def test_cache_holds_shrunk_train_images_and_exact_test_crops(tmp_path, mode, workers):
    train, test = dataset(tmp_path, "train"), dataset(tmp_path, "test")
    sizes = Sizes(short_side=32, test_resize=36, test_crop=32, resize_mode=mode)
    folder = ensure_cache(tmp_path / "cache" / cache_key(train, test, sizes, "v1"), train, test, sizes, workers)
    cached = DecodedDataset(folder, "train", train.labels)
    for i, (width, height) in enumerate(SIZES):
        image = cached.image(i)
        scale = min(1.0, 32 / min(width, height))  # reduced to 32 px on the short side, never enlarged
        assert image.shape == (round(height * scale), round(width * scale), 3)
    # The test images are the recipe's test transform of the original file, pixel for pixel.
    resize = (36, 36) if mode == "squash" else 36
    recipe = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(32)])
    cached_test = DecodedDataset(folder, "test", test.labels)
    for i, path in enumerate(test.paths):
        expected = np.asarray(recipe(load_image(test.root / path)))
        assert np.array_equal(cached_test.image(i), expected)
    image, label = cached_test[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 1


def test_cache_is_built_once_and_its_key_follows_the_data(tmp_path):
    train, test = dataset(tmp_path, "train"), dataset(tmp_path, "test")
    sizes = Sizes(32, 36, 32, "squash")
    key = cache_key(train, test, sizes, "v1")
    folder = ensure_cache(tmp_path / key, train, test, sizes, 0)
    built = (folder / "train.u8").stat().st_mtime_ns
    assert ensure_cache(tmp_path / key, train, test, sizes, 0) == folder
    assert (folder / "train.u8").stat().st_mtime_ns == built  # read, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert cache_key(train, test, sizes, "v2") != key  # another DVC data version
    assert cache_key(train, test, Sizes(48, 36, 32, "squash"), "v1") != key  # other sizes
    target = train.root / train.paths[0]
    photo(99, SIZES[0]).save(target)
    os.utime(target, ns=(1, 1))
    assert cache_key(train, test, sizes, "v1") != key  # a file changed in place


def test_a_failed_build_leaves_no_cache(tmp_path):
    train, test = dataset(tmp_path, "train"), dataset(tmp_path, "test")
    (train.root / train.paths[0]).write_bytes(b"not an image")
    sizes = Sizes(32, 36, 32, "squash")
    with pytest.raises(Exception):
        ensure_cache(tmp_path / "cache" / "k", train, test, sizes, 0)
    assert not (tmp_path / "cache" / "k").exists() and not list((tmp_path / "cache").iterdir())


def test_training_decodes_no_test_image_and_a_failed_test_part_keeps_the_train_part(tmp_path):
    train, test = dataset(tmp_path, "train"), dataset(tmp_path, "test")
    (test.root / test.paths[0]).write_bytes(b"not an image")  # only evaluation would notice
    sizes = Sizes(32, 36, 32, "squash")
    folder = ensure_cache(tmp_path / "cache" / "k", train, test, sizes, 0, with_test=False)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.idx.npy", "train.u8"]
    with pytest.raises(Exception):
        ensure_cache(folder, train, test, sizes, 0)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.idx.npy", "train.u8"]


def test_dataset_pickles_without_its_arrays(tmp_path):
    train, test = dataset(tmp_path, "train"), dataset(tmp_path, "test")
    folder = ensure_cache(tmp_path / "c", train, test, Sizes(32, 36, 32, "squash"), 0)
    cached = DecodedDataset(folder, "train", train.labels, tensor_train_transform(16))
    cached[0]  # opens the memory map
    assert isinstance(cached._data, np.memmap)
    copy = pickle.loads(pickle.dumps(cached))  # what a DataLoader worker receives
    assert copy._data is None
    image, _ = copy[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def test_shrink_never_enlarges_and_normalize_matches_the_float_transform():
    small = photo(1, (20, 10))
    assert shrink(small, 32).shape == (10, 20, 3)
    assert shrink(photo(1, (200, 100)), 50).shape == (50, 100, 3)
    array = np.asarray(photo(3, (8, 8)))
    expected = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(array)
    got = normalize(torch.from_numpy(array).permute(2, 0, 1)[None])[0]
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_from_the_cache_are_normalised_on_the_device(channels_last):
    from finetune.train.runtime import Runtime, to_device

    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    images, labels = to_device(batch, torch.tensor([0, 1]), Runtime(torch.device("cpu"), None, channels_last))
    assert images.dtype == torch.float32 and torch.allclose(images, normalize(batch))
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
