"""Train augmentation (finetune/train/augment.py): one draw of torchvision's boxes and flips for
every path; on the device, on CPU tensors: the CPU path's shapes and dtype, torchvision's crop +
resize within a tolerance, and a training with it. The paths against each other:
test_augment_equivalence.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import photo
from PIL import Image
from test_training import fit_tiny, make_project
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.core.config import load_params
from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache, normalize
from finetune.data.images import FileListDataset
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD
from finetune.train.augment import (
    CropBatch,
    CropDataset,
    augment_where,
    collate_crops,
    crop_resize,
    draw,
    tensor_train_transform,
    train_transform,
)
from finetune.train.loaders import loaders
from finetune.train.runtime import Runtime, to_device

SIZES = [(90, 40), (40, 90), (64, 64), (33, 47)]  # width, height


def smooth(height: int, width: int) -> np.ndarray:
    """An HWC uint8 image of slow waves (what a photo mostly is at these scales)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([127 + 100 * np.sin(x / 13), 127 + 100 * np.cos(y / 17), 127 + 80 * np.sin((x + y) / 23)],
                    -1).astype(np.uint8)


@pytest.fixture
def cache(tmp_path) -> DecodedDataset:
    root = tmp_path / "data"
    paths = []
    for i, size in enumerate(SIZES):
        path = root / "train" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(i, size).save(path)
        paths.append(path.relative_to(root).as_posix())
    train = FileListDataset(root, paths, [i % 2 for i in range(len(SIZES))], None)
    sizes = Sizes(48, 36, 32, "squash")
    folder = ensure_cache(tmp_path / cache_key(train, train, sizes, "v1"), train, train, sizes, 0, with_test=False)
    return DecodedDataset(folder, "train", train.labels, tensor_train_transform(24))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_draws_are_torchvisions_boxes_and_flips(cache, seed):
    """Every path's draw is, item by item, exactly the boxes and flips of torchvision's v2
    RandomResizedCrop + RandomHorizontalFlip."""
    cpu, device = [], []
    torch.manual_seed(seed)
    for i in range(len(cache)):
        height, width = cache.image(i).shape[:2]
        crop = v2.RandomResizedCrop(24, antialias=True)
        params = crop.make_params([torch.zeros(3, height, width, dtype=torch.uint8)])
        cpu.append((params["top"], params["left"], params["height"], params["width"], bool(torch.rand(1) < 0.5)))
    torch.manual_seed(seed)
    device = [draw(*cache.image(i).shape[:2]) for i in range(len(cache))]
    assert device == cpu
    # ... and what the cache path's transform does with the same seed is that box, flipped or not.
    torch.manual_seed(seed)
    image, _ = cache[0]
    top, left, h, w, flip = cpu[0]
    expected = F.resized_crop(torch.from_numpy(cache.image(0).copy()).permute(2, 0, 1), top, left, h, w, [24, 24],
                              antialias=True)
    assert torch.equal(image, expected.flip(-1) if flip else expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draws_take_the_classic_transforms_boxes(seed):
    """The same random boxes as the book's PIL transform (torchvision's classic RandomResizedCrop)."""
    image = photo(seed, (80, 60))
    torch.manual_seed(seed)
    box_v1 = transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(seed)
    crop = v2.RandomResizedCrop(24, antialias=True)
    params = crop.make_params([torch.zeros(3, 60, 80, dtype=torch.uint8)])
    assert (params["top"], params["left"], params["height"], params["width"]) == box_v1
    torch.manual_seed(seed)
    assert draw(60, 80)[:4] == box_v1


def test_train_transform_crops_flips_and_normalises():
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    tensor = train_transform(32)(grey)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(tensor.mean((1, 2)), expected, atol=0.02)


def test_train_transform_is_random():
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (0, 0, 32, 64))  # white left half: crops and flips move it
    torch.manual_seed(0)
    outputs = [train_transform(16)(image) for _ in range(6)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_pil_path_is_the_books_transform(seed):
    """train_transform is, pixel for pixel, the book's RandomResizedCrop + RandomHorizontalFlip +
    ToTensor + Normalize for the same seed."""
    image = photo(seed, (80, 60))
    book = transforms.Compose([transforms.RandomResizedCrop(32), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(seed)
    expected = [book(image) for _ in range(4)]
    torch.manual_seed(seed)
    assert all(torch.equal(train_transform(32)(image), want) for want in expected)


def test_device_batches_have_the_cpu_paths_shape_dtype_and_layout(cache):
    cpu_batch = torch.stack([cache[i][0] for i in range(len(cache))])
    crops = CropDataset(cache, 24)
    batch, labels = crops.collate([crops[i] for i in range(len(crops))])
    assert isinstance(batch, CropBatch) and labels.tolist() == cache.labels
    for channels_last in (True, False):
        runtime = Runtime(torch.device("cpu"), None, channels_last)
        got, _ = to_device(batch, labels, runtime)
        want, _ = to_device(cpu_batch, labels, runtime)
        assert got.shape == want.shape == (4, 3, 24, 24) and got.dtype == want.dtype == torch.float32
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("box", [(10, 20, 200, 300), (5, 7, 50, 40), (0, 0, 256, 340), (30, 40, 224, 224)])
def test_crop_resize_matches_torchvisions_resized_crop(box):
    """Enlarging: bilinear at the same sample points (rounding apart); shrinking: a box filter
    against torchvision's antialiasing filter, within a grey level on average."""
    image = smooth(256, 340)
    top, left, h, w = box
    # A smaller crop shares the canvas: the box's far edges must not see the zero padding.
    batch, _ = collate_crops([(image[top:top + h, left:left + w], 0, False), (image[:9, :9], 1, False)], 224)
    got = crop_resize(batch)[0]
    want = F.resized_crop(torch.from_numpy(image).permute(2, 0, 1), top, left, h, w, [224, 224], antialias=True)
    difference = (got - want.float()).abs()
    assert difference.mean() < 0.5 and difference.max() <= 1.5
    small = crop_resize(batch)[1]
    want_small = F.resize(torch.from_numpy(image[:9, :9].copy()).permute(2, 0, 1), [224, 224], antialias=True)
    assert (small - want_small.float()).abs().max() <= 1.0


def test_flagged_images_are_flipped_and_normalised():
    image = smooth(40, 50)
    items = [(image, 0, False), (image, 1, True)]
    batch, _ = collate_crops(items, 16)
    plain, flipped = crop_resize(batch)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    images, _ = to_device(batch, torch.tensor([0, 1]), Runtime(torch.device("cpu"), None, False))
    assert torch.allclose(images[0], normalize(plain[None])[0], atol=1e-6)


@pytest.mark.parametrize(("setting", "decode_cache", "device", "where"), [
    ("auto", True, "cuda", "device"), ("auto", True, "cpu", "cpu"), ("device", True, "cpu", "device"),
    ("cpu", True, "cuda", "cpu"), ("device", False, "cuda", "cpu"), ("auto", False, "cuda", "cpu")])
def test_where_augmentation_runs(setting, decode_cache, device, where):
    assert augment_where(setting, decode_cache, device) == where


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_batches_pin_and_move_without_blocking():
    batch, _ = collate_crops([(smooth(30, 40), 0, True)], 16)
    pinned = batch.pin_memory()
    assert pinned.canvas.is_pinned() and pinned.flips.is_pinned()
    moved = crop_resize(pinned.to(torch.device("cuda")))
    assert moved.is_cuda and torch.allclose(moved.cpu(), crop_resize(batch), atol=1e-2)


@pytest.mark.slow
def test_a_tiny_training_augments_on_the_device(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p")
    model, run = fit_tiny(project, augment_on="device", workers=1)
    params = load_params(project / "params.yaml")
    data = loaders(params, params.train["finetune"], project / params.data.dir, project / params.validate_.files,
                   pin=False, project=project)
    batch, labels = next(iter(data.train))  # through a worker process: the dataset and collate pickle
    assert isinstance(batch, CropBatch) and batch.canvas.dtype == torch.uint8 and len(batch) == len(labels)
    before = [p.clone() for p in model.parameters()]
    history = run().history
    assert [s.epoch for s in history] == [1, 2] and all(np.isfinite(s.train_loss) for s in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_cpu_path_is_left_as_it_was(tmp_path):
    project = make_project(tmp_path / "p", **{"train.finetune.augment_on": "cpu"})
    params = load_params(project / "params.yaml")
    data = loaders(params, params.train["finetune"], project / params.data.dir, project / params.validate_.files,
                   pin=False, project=project)
    images, _ = next(iter(data.train))
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
