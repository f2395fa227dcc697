"""The three train-augmentation paths (finetune/train/augment.py) agree: from the same files and
the same seed, the PIL path (no decode cache), the cache path (uint8 tensors in the workers) and
the device path (roi_align on batches) draw the same boxes and flips, image after image, and make
the same pixels within the tolerance of their resampling; the evaluation geometry likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_augment import smooth

import finetune.train.augment as augment
from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache, normalize
from finetune.data.images import FileListDataset
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from finetune.train.augment import CropDataset, augment_batch, draw, tensor_train_transform, train_transform

# The recipe's geometry at a small scale: the cache keeps the shorter side at test_resize (256)
# and crops train_crop (224), so a box (at most 4:3) shrinks by about 1.5 at most; here crops of
# 32 from images of shorter side 36-40 (wide, tall, square), and one smaller (enlarged).
SIZES = [(54, 36), (36, 54), (40, 40), (24, 30)]  # width, height
CROP = 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def sources(tmp_path) -> tuple[FileListDataset, DecodedDataset, list[np.ndarray]]:
    """The same images as files (lossless PNG: the PIL path reads these pixels), in a decode
    cache that keeps them as they are (its shorter side is above theirs), and as arrays."""
    root, paths, arrays = tmp_path / "data", [], []
    for i, (width, height) in enumerate(SIZES):
        path = root / "train" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays.append(smooth(height, width))
        Image.fromarray(arrays[-1]).save(path)
        paths.append(path.relative_to(root).as_posix())
    files = FileListDataset(root, paths, [i % 2 for i in range(len(SIZES))], train_transform(CROP))
    sizes = Sizes(64, 36, 32, "squash")
    folder = ensure_cache(tmp_path / cache_key(files, files, sizes, "v1"), files, files, sizes, 0, with_test=False)
    cache = DecodedDataset(folder, "train", files.labels, tensor_train_transform(CROP))
    assert all(np.array_equal(cache.image(i), array) for i, array in enumerate(arrays))
    return files, cache, arrays


def grey_levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255, where the tolerances below are stated."""
    mean = torch.tensor(IMAGENET_MEAN, device=normalised.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=normalised.device).view(3, 1, 1)
    return (normalised.float() * std + mean) * 255


def each_path(files, cache, seed: int, device: str) -> dict[str, list[torch.Tensor]]:
    """Every image through each path, in order, each path from ``seed`` (as a loader worker
    seeded alike would), normalised, in grey levels."""
    torch.manual_seed(seed)
    pil = [files[i][0] for i in range(len(files))]
    torch.manual_seed(seed)
    cached = [normalize(cache[i][0][None])[0] for i in range(len(cache))]
    torch.manual_seed(seed)
    crops = CropDataset(cache, CROP)
    batch, _ = crops.collate([crops[i] for i in range(len(crops))])
    on_device = list(augment_batch(batch, torch.device(device)).cpu())
    return {name: [grey_levels(image) for image in images]
            for name, images in (("pil", pil), ("cache", cached), ("device", on_device))}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_path_draws_the_same_boxes_and_flips(sources, monkeypatch, seed):
    files, cache, arrays = sources
    torch.manual_seed(seed)
    expected = [draw(array.shape[0], array.shape[1]) for array in arrays]  # one after another
    applied, original = [], augment.apply

    def recording(image, params, size):
        applied.append(params)
        return original(image, params, size)

    monkeypatch.setattr(augment, "apply", recording)
    for path in (files, cache):  # PIL, then the cache's uint8 tensors
        applied.clear()
        torch.manual_seed(seed)
        for i in range(len(path)):
            path[i]
        assert applied == expected
    torch.manual_seed(seed)
    for i, (box, _, flip) in enumerate(CropDataset(cache, CROP)[i] for i in range(len(cache))):
        top, left, height, width, flipped = expected[i]
        assert np.array_equal(box, arrays[i][top:top + height, left:left + width]) and flip == flipped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(8))
def test_every_path_makes_the_same_pixels(sources, seed, device):
    """Tolerances, in grey levels (0..255):

    - PIL against the cache's uint8 tensors: the same box resized by the same filter
      (antialiased bilinear, at the same sample points), each rounding once to uint8, Pillow in
      fixed point and torch in float: at most one level apart (float noise of normalising aside).
    - The device against the cache: roi_align is exact bilinear at the same points when it
      enlarges and a box filter where torchvision's is a triangle when it shrinks (by at most
      about 1.5 here, as in the recipe), and it does not round: on these smooth images (a
      photo's content at this scale) within 1.5 levels, half a level on average (the bounds of
      tests/train/test_augment.py; measured over 200 seeds: 1.36 and 0.32).
    A path that drew another box or flip would be further off: at these seeds, the opposite
    flip moves some pixel by 14 levels or more, another box by 20 or more."""
    files, cache, _ = sources
    out = each_path(files, cache, seed, device)
    for pil, cached, on_device in zip(out["pil"], out["cache"], out["device"], strict=True):
        assert pil.shape == cached.shape == on_device.shape == (3, CROP, CROP)
        assert (pil - cached).abs().max() <= 1 + 1e-3
        difference = (on_device - cached).abs()
        assert difference.max() <= 1.5 and difference.mean() <= 0.5


@pytest.mark.parametrize("mode", ["squash", "aspect"])
def test_validation_crops_from_the_cache_match_the_eval_transform(sources, mode):
    """Validation reads the cached train images through the evaluation geometry on uint8
    tensors (Sizes.eval_crop); evaluation and prediction read files through eval_transform on
    PIL images: the same resize and crop, within one level (each rounds once to uint8)."""
    files, cache, arrays = sources
    sizes = Sizes(64, 36, 32, mode)
    for i, array in enumerate(arrays):
        from_cache = sizes.eval_crop()(torch.from_numpy(cache.image(i).copy()).permute(2, 0, 1))
        from_file = eval_transform(36, 32, mode)(Image.fromarray(array))
        assert (grey_levels(normalize(from_cache[None])[0]) - grey_levels(from_file)).abs().max() <= 1 + 1e-3
