"""Real image files of every kind the index must handle, written by the tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A small image whose pixels depend on ``seed`` (so files differ byte for byte)."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x * 7 + seed * 37) % 256, (y * 11 + seed * 13) % 256, (x + y + seed * 5) % 256)
                   for y in range(height) for x in range(width)])
    return image.convert(mode) if mode != "RGB" else image


def rgb_jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=90)


def exif_rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(photo(seed, (60, 40)), "JPEG", exif=exif.tobytes())


def sixteen_bit_png(seed: int) -> bytes:
    image = Image.new("I;16", (40, 40))
    image.putdata([(i * 997 + seed * 31) % 65536 for i in range(40 * 40)])
    return encode(image, "PNG")


# The valid oddities: (file name, bytes, the mode the index must record).
ODDITIES = {
    "cmyk.jpg": (lambda: encode(photo(101, mode="CMYK"), "JPEG"), "CMYK"),
    "gray.jpg": (lambda: encode(photo(102, mode="L"), "JPEG"), "L"),
    "rgba.png": (lambda: encode(photo(103, mode="RGBA"), "PNG"), "RGBA"),
    "palette.gif": (lambda: encode(photo(104).convert("P"), "GIF"), "P"),
    "deep.png": (lambda: sixteen_bit_png(105), None),  # Pillow reads it as I;16 (or I)
    "rotated.jpg": (lambda: exif_rotated_jpeg(106), "RGB"),
}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def write_dataset(root: Path, train: int = 3, test: int = 2,
                  classes: tuple[str, ...] = ("hotdog", "not-hotdog")) -> Path:
    """A valid dataset of distinct RGB JPEGs: ``root/{train,test}/<class>/NNNN.jpg``."""
    seed = 0
    for split, count in (("train", train), ("test", test)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                (folder / f"{i:04d}.jpg").write_bytes(rgb_jpeg(seed))
    return root


def write_content(path: Path, content) -> Path:
    """A file for a bad-input test: bytes as they are, any other object through torch.save,
    None: no file at all."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        import torch

        torch.save(content, path)
    return path
