"""A small two-class dataset of real photos, offline: crops of the two JPEG photos that
scikit-learn ships (``china.jpg``, a temple; ``flower.jpg``), written as a zip of the hotdog.zip
layout. Train crops come from the left 60% of each photo and test crops from the right 40%, so
no test pixel was seen in training.

`python bench/photo_crops.py OUT.zip [--train 36] [--test 50] [--seed 0]` prints the archive's
sha256, for ``data.url: file://OUT.zip`` and ``data.checksum: sha256:<hex>`` in a workspace's
params.yaml (docs/stages.md, "Another dataset of the same layout").
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

PHOTOS = {"temple": "china.jpg", "flower": "flower.jpg"}
TRAIN_SHARE = 0.6  # of each photo's width: train crops left of it, test crops right of it


def crops(photo: Image.Image, count: int, left: float, right: float, rng: random.Random) -> list[bytes]:
    """``count`` JPEGs of random square crops (a fifth to half the photo's height) whose boxes lie
    between ``left`` and ``right`` (shares of the width), some flipped, at 64-160 px."""
    width, height = photo.size
    out = []
    for _ in range(count):
        side = rng.randint(height // 5, height // 2)
        x0 = rng.randint(int(left * width), max(int(left * width), int(right * width) - side))
        y0 = rng.randint(0, height - side)
        crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((rng.randint(64, 160),) * 2)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_archive(path: Path, train: int, test: int, seed: int, root: str = "photos") -> str:
    """Write the archive; its sha256."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for name, file in PHOTOS.items():
            photo = Image.fromarray(np.asarray(load_sample_image(file)))
            for split, count, (left, right) in (("train", train, (0.0, TRAIN_SHARE)),
                                                ("test", test, (TRAIN_SHARE, 1.0))):
                for i, data in enumerate(crops(photo, count, left, right, rng)):
                    info = zipfile.ZipInfo(f"{root}/{split}/{name}/{i:04d}.jpg", (1980, 1, 1, 0, 0, 0))
                    archive.writestr(info, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the zip to write")
    parser.add_argument("--train", type=int, default=36, help="train crops per class")
    parser.add_argument("--test", type=int, default=50, help="test crops per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digest = write_archive(args.out, args.train, args.test, args.seed)
    print(f"{args.out}: sha256:{digest}")


if __name__ == "__main__":
    main()
