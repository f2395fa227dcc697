"""Images to tensors as the recipe prescribes, and datasets over the validated file list.

Preprocessing must match pretraining: ImageNet mean and std. Train: RandomResizedCrop +
horizontal flip. Test: resize (both sides, as the book; or the shorter side, as torchvision's
``weights.transforms()``) then center crop. Every image becomes RGB first, whatever its mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from finetune.errors import FinetuneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(crop: int) -> transforms.Compose:
    """RandomResizedCrop(crop) + RandomHorizontalFlip, normalised with ImageNet statistics."""
    return transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resize: int, crop: int, mode: str) -> transforms.Compose:
    """``squash``: both sides to ``resize`` (the book); ``aspect``: the shorter side (torchvision);
    then CenterCrop(crop), normalised with ImageNet statistics."""
    if mode == "squash":
        resizing = transforms.Resize((resize, resize))
    elif mode == "aspect":
        resizing = transforms.Resize(resize)
    else:
        raise ValueError(f"resize mode {mode!r}: use squash or aspect")
    return transforms.Compose([resizing, transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path: Path | BinaryIO) -> Image.Image:
    """An RGB image (from a file or a binary stream) as a viewer shows it: EXIF rotation
    applied, any mode converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            image = _sixteen_to_eight_bits(image)
        elif image.mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")  # as Pillow advises for palettes with transparency
        return image.convert("RGB")


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A grey 8-bit image from a 16-bit one (I;16*, or I as some Pillow versions read such PNGs).

    Pillow's own convert clips every value above 255 to white; keeping the top 8 bits scales
    0..65535 to 0..255. An ``I`` image whose values all fit in 8 bits is taken as it is.
    """
    array = np.asarray(image).astype(np.int64)
    if image.mode.startswith("I;16") or array.max() > 255:
        array = np.clip(array, 0, 65535) >> 8
    return Image.fromarray(array.astype(np.uint8), "L")


class FileListDataset(torch.utils.data.Dataset):
    """(image tensor, label) for a list of files relative to ``root``."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], transform) -> None:
        self.root, self.paths, self.labels, self.transform = Path(root), paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.root / self.paths[index])), self.labels[index]


def load_splits(root: Path, files_csv: Path, train_tf, test_tf) -> tuple[FileListDataset, FileListDataset, list[str]]:
    """Train and test datasets over the validated file list (path, split, class), and the
    sorted class names whose indices are the labels (as torchvision's ImageFolder)."""
    if not Path(files_csv).exists():
        raise FinetuneError(f"{files_csv} (validate.files) does not exist: run the validate stage first "
                            "(`dvc repro validate`); it writes the list only when the data passes.")
    files = pd.read_csv(files_csv)
    absent = sorted({"path", "split", "class"} - set(files.columns))
    if absent:
        raise FinetuneError(f"{files_csv} has no column(s) {absent}: it is not the validate stage's file "
                            "list. Run `dvc repro validate` to write it again.")
    classes = sorted(files.loc[files["split"] == "train", "class"].unique())
    unknown = sorted(set(files.loc[files["split"] == "test", "class"]) - set(classes))
    if unknown:
        raise FinetuneError(f"{files_csv}: test classes {unknown} have no train images; validate the data again.")
    index = {name: i for i, name in enumerate(classes)}

    def dataset(split: str, transform) -> FileListDataset:
        rows = files[files["split"] == split]
        return FileListDataset(root, list(rows["path"]), [index[c] for c in rows["class"]], transform)

    return dataset("train", train_tf), dataset("test", test_tf), classes
