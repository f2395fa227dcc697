"""Datasets over the validated file list: each file read as an RGB image, whatever its mode
(``load_image``), and given to the transform the caller passes.

The transforms live elsewhere, each in one place: train-time augmentation in
finetune/train/augment.py; the evaluation transform (resize, center crop, ImageNet
normalisation) in finetune/data/portable.py, since every registered model ships that file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from finetune.core.errors import FinetuneError

# Image reading is the served model's too: it lives in the file every registered model ships
# (portable.py). The statistics are named here for finetune/train/figures.py.
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD, load_image  # noqa: F401


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
