"""The image index on real files: every mode Pillow reads, broken files, odd folder layouts."""

from __future__ import annotations

import hashlib
import time

import pytest
from images import ODDITIES, huge_png, rgb_jpeg, write_dataset

from finetune.ingest.index import COLUMNS, build_index, inspect_file, list_dataset

LIMIT = 89_478_485


@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_valid_oddities_decode_and_record_their_mode(tmp_path, name):
    make, mode = ODDITIES[name]
    path = tmp_path / name
    path.write_bytes(make())
    row = inspect_file(path, LIMIT)
    assert row["decodes"] is True and row["error"] is None
    assert row["mode"] == mode if mode else row["mode"] in ("I;16", "I")
    assert row["width"] > 0 and row["height"] > 0
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert row["bytes"] == path.stat().st_size


def test_exif_orientation_is_recorded(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(ODDITIES["rotated.jpg"][0]())
    row = inspect_file(path, LIMIT)
    assert row["orientation"] == 6 and (row["width"], row["height"]) == (60, 40)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (bytes(range(256)) * 8, "UnidentifiedImageError"),
        (rgb_jpeg(1, (200, 160))[:900], "truncated"),
        (b"this is a text file, not a picture\n", "UnidentifiedImageError"),
        (b"", "UnidentifiedImageError"),
    ],
    ids=["garbage", "truncated", "text", "empty"],
)
def test_broken_files_are_recorded_not_raised(tmp_path, data, error):
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    row = inspect_file(path, LIMIT)
    assert row["decodes"] is False and error in row["error"]


def test_a_truncated_jpeg_passes_the_header_but_not_the_full_decode(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(rgb_jpeg(1, (200, 160))[:900])
    row = inspect_file(path, LIMIT)
    # The header was read (its size is known); only load() finds the missing data.
    assert (row["width"], row["height"], row["format"]) == (200, 160, "JPEG") and not row["decodes"]


def test_huge_declared_dimensions_are_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png())
    started = time.perf_counter()
    row = inspect_file(path, LIMIT)
    assert time.perf_counter() - started < 5  # not decoded: 10^10 pixels would take minutes
    assert row["decodes"] is False and "validate.max_pixels" in row["error"]
    assert (row["width"], row["height"]) == (100_000, 100_000)


def test_listing_finds_classes_stray_files_and_ignores_hidden_entries(tmp_path):
    write_dataset(tmp_path, train=2, test=1)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "stray.jpg").write_bytes(rgb_jpeg(50))
    (tmp_path / "train" / "hotdog" / "nested").mkdir()
    (tmp_path / "train" / "hotdog" / "nested" / "deep.jpg").write_bytes(rgb_jpeg(51))
    (tmp_path / "train" / "hotdog" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "README.txt").write_text("about the data")
    listing = list_dataset(tmp_path)
    assert listing.classes == {"test": ["hotdog", "not-hotdog"], "train": ["empty", "hotdog", "not-hotdog"]}
    assert ("train", None, "train/stray.jpg") in listing.files
    assert ("train", "hotdog", "train/hotdog/nested/deep.jpg") in listing.files
    assert not any(".DS_Store" in path for _, _, path in listing.files)
    assert listing.ignored == ["README.txt"] and len(listing.files) == 8


@pytest.mark.parametrize("workers", [1, 2])
def test_index_has_one_row_per_file_whatever_the_workers(tmp_path, workers):
    write_dataset(tmp_path, train=20, test=15)  # 70 files: enough for the process pool
    listing = list_dataset(tmp_path)
    index = build_index(tmp_path, listing, max_pixels=LIMIT, workers=workers)
    assert list(index.columns) == list(COLUMNS) and len(index) == 70
    assert index["decodes"].all() and set(index["ext"]) == {".jpg"}
    assert index.groupby(["split", "class"]).size().to_dict() == {
        ("test", "hotdog"): 15, ("test", "not-hotdog"): 15, ("train", "hotdog"): 20, ("train", "not-hotdog"): 20}
    row = index.set_index("path").loc["train/hotdog/0003.jpg"]
    assert row["sha256"] == hashlib.sha256((tmp_path / "train/hotdog/0003.jpg").read_bytes()).hexdigest()
    assert (row["width"], row["height"], row["mode"]) == (48, 40, "RGB")


def test_listing_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_dataset(tmp_path / "absent")
