"""Train-time augmentation, all of it: the recipe's RandomResizedCrop + horizontal flip, drawn in
one place (:func:`draw`) and applied on whichever of three paths the loaders pick
(finetune/train/loaders.py):

| path   | runs when                        | a loader worker                        | the training process            |
|--------|----------------------------------|----------------------------------------|---------------------------------|
| PIL    | ``decode_cache: false``          | reads the file, then                   | copies the float batch          |
|        |                                  | :func:`train_transform`: draw, apply,  |                                 |
|        |                                  | normalise                              |                                 |
| cache  | ``decode_cache: true`` and       | :func:`tensor_train_transform` on a    | copies the uint8 batch,         |
|        | ``augment_on: cpu`` (``auto``    | cached uint8 image: draw, apply        | normalises it (to_device)       |
|        | off CUDA)                        |                                        |                                 |
| device | ``decode_cache: true`` and       | :class:`CropDataset`: draw, slice the  | :func:`augment_batch`: copy,    |
|        | ``augment_on: device`` (``auto`` | box's bytes out of the cache           | :func:`crop_resize` (roi_align, |
|        | on CUDA)                         |                                        | flip), normalise                |

(:func:`augment_where` reads ``augment_on``; the loaders build the datasets accordingly.)

Every path draws an image's parameters with :func:`draw` alone, once per image, from torch's
global generator (which the DataLoader seeds in each worker from the training seed): the same
seed gives the same boxes and flips on every path, and the same ones as torchvision's
``RandomResizedCrop`` + ``RandomHorizontalFlip``. PIL images and uint8 tensors are then
transformed by one function (:func:`apply`, torchvision's v2 kernels take both); device batches
by :func:`crop_resize`. tests/train/test_augment_equivalence.py checks that the three agree.

To add an op: draw its random parameters in :func:`draw` (a new field of :class:`Draw`, drawn
after the existing ones, so that a seed keeps its boxes); apply it in :func:`apply` and in
:func:`crop_resize` (carry what it needs in :class:`CropBatch`, filled by :func:`collate_crops`);
then add it to the equivalence test.

On the device, roi_align's bilinear samples at bin centres are exactly those of a bilinear resize
(``align_corners=False``) when enlarging; when shrinking it averages ``ceil(box / crop)`` samples
per bin and axis, a box filter close to torchvision's antialiased resize (tests/train/
test_augment.py states how close). The evaluation transform is not here: it is the served
model's too (finetune/data/portable.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from finetune.data.decoded import DecodedDataset, normalize
from finetune.data.portable import to_network_input

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults: the recipe's
FLIP_P = 0.5


def augment_where(setting: str, decode_cache: bool, device_type: str) -> str:
    """Where train augmentation runs: ``cpu`` (loader workers) or ``device`` (batched, after the copy).

    ``auto``: the device on CUDA, the CPU elsewhere. On a CPU "the device" is the training
    process itself: measured on the 2-core CPU (docs/speed.md), roi_align there ran about 4x
    slower than the workers' v2 transform (57-141 against 223-566 images/s per thread), and in a
    worker the transform overlaps the step. Device augmentation reads the decode cache, so
    without it the answer is always ``cpu``."""
    if not decode_cache:
        return "cpu"
    if setting == "auto":
        return "device" if device_type == "cuda" else "cpu"
    return setting


class Draw(NamedTuple):
    """One image's random parameters: its crop box in pixels, and whether it is flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw(height: int, width: int) -> Draw:
    """The parameters of one ``height`` x ``width`` image, drawn as torchvision's
    RandomResizedCrop then RandomHorizontalFlip draw them (the same random numbers, in order)."""
    shape_only = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads the shape, no pixels
    top, left, box_h, box_w = transforms.RandomResizedCrop.get_params(shape_only, list(SCALE), list(RATIO))
    flip = bool(torch.rand(1) < FLIP_P)  # RandomHorizontalFlip: flips when rand(1) < p
    return Draw(top, left, box_h, box_w, flip)


def apply(image: Image.Image | torch.Tensor, params: Draw, size: int) -> Image.Image | torch.Tensor:
    """``image`` (PIL, or uint8 CHW) cropped to the drawn box, resized to ``size`` x ``size``
    (bilinear, antialiased) and flipped if drawn; the same type comes back."""
    out = F.resized_crop(image, params.top, params.left, params.height, params.width, [size, size],
                         antialias=True)
    return F.horizontal_flip(out) if params.flip else out


class RandomCropFlip:
    """The recipe's augmentation of one image (PIL, or uint8 CHW): :func:`draw`, then :func:`apply`."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        height, width = F.get_size(image)
        return apply(image, draw(height, width), self.size)

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size})"


def train_transform(crop: int) -> transforms.Compose:
    """The PIL path: a PIL image augmented, then a float CHW normalised with ImageNet statistics."""
    return transforms.Compose([RandomCropFlip(crop), to_network_input()])


def tensor_train_transform(crop: int) -> RandomCropFlip:
    """The cache path: a cached uint8 CHW image augmented, still uint8 (normalised on the device)."""
    return RandomCropFlip(crop)


@dataclass
class CropBatch:
    """A batch to crop on the device: each box's pixels at the top left of ``canvas``."""

    canvas: torch.Tensor  # (N, H, W, 3) uint8; each crop's last row and column repeated once
    sizes: torch.Tensor  # (N, 2) int64: each crop's height and width
    flips: torch.Tensor  # (N,) bool
    size: int  # the output side (model.train_crop)

    def __len__(self) -> int:
        return len(self.flips)

    def pin_memory(self) -> CropBatch:
        """Page-locked copies (the DataLoader's pin_memory thread calls this), so that the copy
        to a GPU can be asynchronous."""
        return CropBatch(self.canvas.pin_memory(), self.sizes.pin_memory(), self.flips.pin_memory(), self.size)

    def to(self, device: torch.device) -> CropBatch:
        """The batch on ``device`` (non-blocking from pinned memory)."""
        return CropBatch(self.canvas.to(device, non_blocking=True), self.sizes.to(device, non_blocking=True),
                         self.flips.to(device, non_blocking=True), self.size)


class CropDataset(Dataset):
    """The device path's items: (box pixels as a uint8 HWC array, label, flip) of the decode
    cache's train images; its ``collate`` makes the DataLoader's batches :class:`CropBatch`."""

    def __init__(self, decoded: DecodedDataset, size: int) -> None:
        self.decoded, self.size = decoded, size

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, bool]:
        image = self.decoded.image(index)  # a view of the memory map: nothing is read yet
        top, left, box_h, box_w, flip = draw(image.shape[0], image.shape[1])
        return image[top:top + box_h, left:left + box_w], self.decoded.labels[index], flip

    def collate(self, items: list[tuple[np.ndarray, int, bool]]) -> tuple[CropBatch, torch.Tensor]:
        """The boxes copied into one canvas (the only pixel work a worker does) and the labels."""
        return collate_crops(items, self.size)


def collate_crops(items: list[tuple[np.ndarray, int, bool]], size: int) -> tuple[CropBatch, torch.Tensor]:
    """Crops of any sizes into a zero canvas, each at the top left with its last row and column
    repeated once (so that roi_align's samples at a box's far edge see the edge, not the zeros:
    the clamping a resize does), plus their sizes, flips and labels."""
    height = max(crop.shape[0] for crop, _, _ in items) + 1
    width = max(crop.shape[1] for crop, _, _ in items) + 1
    canvas = np.zeros((len(items), height, width, 3), dtype=np.uint8)
    for i, (crop, _, _) in enumerate(items):
        h, w = crop.shape[:2]
        canvas[i, :h, :w] = crop
        canvas[i, h, :w] = crop[h - 1]
        canvas[i, :h + 1, w] = canvas[i, :h + 1, w - 1]
    sizes = torch.tensor([crop.shape[:2] for crop, _, _ in items], dtype=torch.int64)
    flips = torch.tensor([flip for _, _, flip in items], dtype=torch.bool)
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return CropBatch(torch.from_numpy(canvas), sizes, flips, size), labels


@torch.no_grad()
def crop_resize(batch: CropBatch) -> torch.Tensor:
    """Every box resized to ``batch.size`` and flipped where flagged: float NCHW in 0..255 on the
    batch's device, in one roi_align call."""
    images = batch.canvas.permute(0, 3, 1, 2).float()  # NHWC storage: a channels_last float copy
    n = len(batch)
    zeros = torch.zeros(n, 2, device=images.device)
    index = torch.arange(n, device=images.device, dtype=torch.float32)[:, None]
    hw = batch.sizes.to(torch.float32)
    boxes = torch.cat([index, zeros, hw[:, 1:2], hw[:, 0:1]], 1)  # (image, x1, y1, x2, y2) in pixels
    # aligned=True: a pixel's centre is at +0.5, as in a resize with align_corners=False;
    # sampling_ratio=-1: ceil(box / size) samples per bin and axis (an average when shrinking).
    out = roi_align(images, boxes, (batch.size, batch.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(batch.flips.view(-1, 1, 1, 1), out.flip(-1), out)


def augment_batch(batch: CropBatch, device: torch.device) -> torch.Tensor:
    """The device path's last step: a :class:`CropBatch` copied to ``device``, cropped, resized,
    flipped and normalised there."""
    return normalize(crop_resize(batch.to(device)))
