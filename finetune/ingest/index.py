"""The image index: one row per file of a dataset folder, with what can be measured about it.

A dataset has the layout ``<split>/<class>/<file>`` (files deeper inside a class folder belong to
that class, as for torchvision's ImageFolder). Each file is read once: its bytes are hashed and
decoded completely (``load()``, so a truncated JPEG is caught, not only a bad header). Files are
inspected in parallel processes.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from finetune.core.errors import plain_error

SPLITS = ("train", "test")
COLUMNS = ("path", "split", "class", "ext", "bytes", "sha256", "decodes", "error",
           "width", "height", "mode", "format", "orientation")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Listing:
    """What the folders of a dataset hold, before any file is opened.

    ``classes`` maps each split folder found to its class folders (empty ones included);
    ``files`` are (split, class or None for a file lying directly in a split folder, relative path);
    ``ignored`` are top-level entries that are not split folders.
    """

    classes: dict[str, list[str]]
    files: list[tuple[str, str | None, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def list_dataset(root: Path) -> Listing:
    """List ``root``'s splits, class folders and files; hidden entries (``.*``) are skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    classes: dict[str, list[str]] = {}
    files: list[tuple[str, str | None, str]] = []
    ignored = []
    for entry in _visible(root):
        if entry.name not in SPLITS or not entry.is_dir():
            ignored.append(entry.name)
            continue
        classes[entry.name] = []
        for item in _visible(entry):
            if item.is_dir():
                classes[entry.name].append(item.name)
                files.extend((entry.name, item.name, path) for path in _files_below(item, root))
            else:
                files.append((entry.name, None, item.relative_to(root).as_posix()))
    return Listing(classes, files, ignored)


def build_index(root: Path, listing: Listing, *, max_pixels: int, workers: int = 0) -> pd.DataFrame:
    """Inspect every listed file (``workers`` processes, 0 = one per core) into a DataFrame."""
    paths = [root / path for _, _, path in listing.files]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:  # a pool costs more than it saves on a handful
        rows = [inspect_file(path, max_pixels) for path in paths]
    else:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(inspect_file, paths, [max_pixels] * len(paths), chunksize=32))
    frame = pd.DataFrame(rows, columns=COLUMNS[4:])
    frame.insert(0, "path", [path for _, _, path in listing.files])
    frame.insert(1, "split", [split for split, _, _ in listing.files])
    frame.insert(2, "class", [cls for _, cls, _ in listing.files])
    frame.insert(3, "ext", [Path(path).suffix.lower() for _, _, path in listing.files])
    return frame.astype({"width": "Int64", "height": "Int64", "orientation": "Int64"})


def inspect_file(path: Path, max_pixels: int) -> dict[str, object]:
    """Size, sha256 and a full decode of one file; never raises for a bad image.

    An image whose header declares more than ``max_pixels`` is not decoded (a decompression
    bomb would exhaust memory); its declared size is still recorded.
    """
    data = path.read_bytes()
    row: dict[str, object] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                              "decodes": False, "error": None, "width": None, "height": None,
                              "mode": None, "format": None, "orientation": None}
    try:
        with _open_unlimited(data) as image:
            row.update(width=image.width, height=image.height, mode=image.mode, format=image.format)
            if image.width * image.height > max_pixels:
                row["error"] = (f"declares {image.width}x{image.height} pixels, more than "
                                f"validate.max_pixels ({max_pixels}): not decoded (decompression bomb guard)")
                return row
            image.load()
            row["orientation"] = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # any decoder failure is a finding about the file, not a crash
        row["error"] = f"{type(err).__name__}: {plain_error(err)}"
        return row
    row["decodes"] = True
    return row


def _open_unlimited(data: bytes) -> Image.Image:
    """Open without Pillow's own bomb check (it raises at open): ``max_pixels`` decides here."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _files_below(folder: Path, root: Path) -> Iterator[str]:
    """Every visible file under ``folder``, as a path relative to ``root``, in sorted order."""
    for item in _visible(folder):
        if item.is_dir():
            yield from _files_below(item, root)
        else:
            yield item.relative_to(root).as_posix()
