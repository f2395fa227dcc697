"""Preprocessing: the evaluation transform, images of every mode to RGB, the validated file list.
(The train transform is tests/train/test_augment.py's.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from images import ODDITIES, photo, write_dataset
from PIL import Image
from torchvision import transforms

from finetune.data.images import FileListDataset, load_image, load_splits
from finetune.data.portable import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from finetune.core.errors import FinetuneError
from finetune.train.augment import train_transform


def test_squash_keeps_the_whole_width_and_aspect_crops_the_middle():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue quarter on the left
    squash = eval_transform(64, 56, "squash")(image)
    aspect = eval_transform(64, 56, "aspect")(image)
    assert squash.shape == aspect.shape == (3, 56, 56)
    blue = (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    assert squash[2, :, :5].mean() > blue - 0.1  # the left edge is still blue
    assert aspect[2, :, :5].mean() < 0  # cropped away: red there
    with pytest.raises(ValueError, match="squash or aspect"):
        eval_transform(64, 56, "stretch")


@pytest.mark.parametrize(("mode", "resize"), [("squash", (64, 64)), ("aspect", 64)])
def test_eval_transform_is_the_classic_transform_pixel_for_pixel(mode, resize):
    """What evaluation, prediction and every registered model see: torchvision's classic Resize,
    CenterCrop, ToTensor and Normalize, exactly (its geometry is v2, for the cache's tensors)."""
    classic = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(56), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for seed, size in enumerate([(200, 100), (77, 131), (56, 56), (40, 30)]):
        image = photo(seed, size)
        assert torch.equal(eval_transform(64, 56, mode)(image), classic(image))


@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_every_mode_loads_as_rgb(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(ODDITIES[name][0]())
    image = load_image(path)
    assert image.mode == "RGB"
    extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1]  # not a flat white or black picture
    if name == "rotated.jpg":
        assert image.size == (40, 60)  # stored 60x40 with "rotate 90": shown upright


def test_sixteen_bit_keeps_its_top_eight_bits(tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(ODDITIES["deep.png"][0]())
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
        stored = np.asarray(raw).astype(np.int64)
    assert stored.max() > 255  # a real 16-bit range, which a plain convert("RGB") clips to white
    pixels = np.asarray(load_image(path))
    assert (pixels[..., 0] == pixels[..., 2]).all()  # grey
    assert np.array_equal(pixels[..., 0], stored >> 8)


def write_list(root, rows):
    path = root / "files.csv"
    pd.DataFrame(rows, columns=["path", "split", "class"]).to_csv(path, index=False)
    return path


def test_load_splits_labels_by_sorted_class_names(tmp_path):
    dataset = write_dataset(tmp_path / "data", train=3, test=2, classes=("zebra", "apple"))
    rows = [(p.relative_to(dataset).as_posix(), p.parts[-3], p.parts[-2]) for p in sorted(dataset.rglob("*.jpg"))]
    train, test, classes = load_splits(dataset, write_list(tmp_path, rows), train_transform(32),
                                       eval_transform(36, 32, "squash"))
    assert classes == ["apple", "zebra"] and (len(train), len(test)) == (6, 4)
    assert [train.labels[train.paths.index(p)] for p in train.paths if "/zebra/" in p] == [1, 1, 1]
    images, labels = next(iter(torch.utils.data.DataLoader(test, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]


def test_file_list_dataset_reads_real_files(tmp_path):
    dataset = write_dataset(tmp_path, train=2, test=1, classes=("a",))
    data = FileListDataset(dataset, ["train/a/0001.jpg", "test/a/0000.jpg"], [3, 7], eval_transform(40, 32, "aspect"))
    assert len(data) == 2 and data[1][1] == 7
    image, label = data[0]
    assert image.shape == (3, 32, 32) and label == 3


def test_load_splits_errors(tmp_path):
    with pytest.raises(FinetuneError, match="dvc repro validate"):
        load_splits(tmp_path, tmp_path / "missing.csv", None, None)
    files = write_list(tmp_path, [("train/a/1.jpg", "train", "a"), ("test/b/1.jpg", "test", "b")])
    with pytest.raises(FinetuneError, match=r"\['b'\] have no train images") as caught:
        load_splits(tmp_path, files, None, None)
    assert str(files) in str(caught.value)
    pd.DataFrame({"file": ["train/a/1.jpg"], "label": ["a"]}).to_csv(files, index=False)
    with pytest.raises(FinetuneError, match=r"no column\(s\) \['class', 'path', 'split'\].*dvc repro validate"):
        load_splits(tmp_path, files, None, None)
