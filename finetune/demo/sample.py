"""Synthetic image-classification datasets written as zips of the d2l ``hotdog.zip`` layout.

The archive holds ``<root>/train/<class>/<NNNN>.jpg`` and ``<root>/test/<class>/<NNNN>.jpg``
(file entries only). Images are RGB JPEGs whose width and height are drawn independently, so
sizes and aspect ratios vary as in the real photos. The tests and the offline demo use these
archives in place of the real data.

Two modes:

* two classes: images of ``classes[0]`` show a hot-dog-like object (a bun with a sausage and
  sometimes mustard); images of the other class show something else (pizza-like discs, shapes,
  blobs, a bare sausage as a hard negative);
* more classes (the "100 kinds of chairs" case): class ``i`` has its own motif, a shape x hue x
  fill-pattern combination chosen deterministically from ``i``.

Every image also gets a textured background of random colour and small distractors, so that
colour alone does not give the class away. The same arguments give byte-identical archives.
"""

from __future__ import annotations

import colorsys
import io
import math
import operator
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finetune.core.files import file_digest, write_atomic

SPLITS = ("train", "test")
# A fixed timestamp so that the archive bytes depend only on the arguments (1980 is zip's epoch).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# A shape is a list of (polygon, keep) parts in unit coordinates (radius about 1), drawn in
# order: keep=False cuts the polygon out again (rings, crescents).
Parts = list[tuple[np.ndarray, bool]]
Motif = Callable[[np.ndarray, np.random.Generator], None]

# Many-class motifs: shapes x hues x fill patterns; 8 * 8 * 4 = 256 distinct combinations.
MOTIF_SHAPES = ("disc", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent")
MOTIF_HUES = (0.0, 30.0, 55.0, 120.0, 180.0, 225.0, 275.0, 320.0)  # degrees: red ... pink
MOTIF_PATTERNS = ("solid", "stripes", "dots", "checker")

# What a not-hot-dog image shows. Four are many-class motif shapes (with the same fill patterns),
# so the source model's features have seen the negatives' parts; the pizza and the bare sausage
# share the hot dog's colours and parts.
NEGATIVE_KINDS = ("pizza", "disc", "square", "triangle", "star", "blob", "sausage")
_CLUTTER_SHAPES = ("disc", "square", "triangle", "blob", "ellipse")


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`write_sample_archive` wrote: the zip, its sha256 and images per split/class."""

    path: Path
    sha256: str
    counts: dict[str, dict[str, int]]


def class_names(num_classes: int) -> list[str]:
    """Class folder names: ``hotdog``/``not-hotdog`` for 2, else ``class-000``, ``class-001``, ...

    Names are zero-padded so that their sorted order is their index order.
    """
    num_classes = _integer("num_classes", num_classes, minimum=2)
    if num_classes == 2:
        return ["hotdog", "not-hotdog"]
    width = max(3, len(str(num_classes - 1)))
    return [f"class-{i:0{width}d}" for i in range(num_classes)]


def write_sample_archive(
    out: Path,
    *,
    classes: Sequence[str],
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
    root: str = "hotdog",
    min_side: int = 48,
    max_side: int = 320,
    quality: int = 90,
) -> SampleSummary:
    """Write a generated dataset zip to ``out`` atomically and return what it holds.

    With two classes, ``classes[0]`` is the hot-dog class; with more, each class gets its own
    motif. Raises ValueError for unusable arguments (see :func:`_check_arguments`).
    """
    classes = list(_check_classes(classes))
    train_per_class, test_per_class, seed, min_side, max_side, quality = _check_arguments(
        train_per_class, test_per_class, seed, root, min_side, max_side, quality
    )
    counts = {"train": train_per_class, "test": test_per_class}
    out = Path(out)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            _write_zip(f, classes, counts, seed, root, (min_side, max_side), quality)

    write_atomic(out, write)  # readers never see a half-written archive
    digest = file_digest(out, "sha256")
    summary_counts = {split: {name: n for name in classes} for split, n in counts.items()}
    return SampleSummary(path=out, sha256=digest, counts=summary_counts)


# --- arguments ---------------------------------------------------------------------------


def _integer(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int (numpy ints accepted, bools and floats refused), at least ``minimum``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    return number


def _check_classes(classes: Sequence[str]) -> Sequence[str]:
    """Refuse class lists that cannot become distinct, safe folder names."""
    if isinstance(classes, str) or len(classes) < 2:
        raise ValueError(f"classes must be a list of at least 2 names, got {classes!r}")
    for name in classes:
        _check_folder_name("class name", name)
    # Compared case-folded: "Dog" and "dog" would be one folder on macOS and Windows.
    folded = [name.casefold() for name in classes]
    duplicates = sorted({name for name in classes if folded.count(name.casefold()) > 1})
    if duplicates:
        raise ValueError(f"class names must be unique (ignoring case); repeated: {duplicates}")
    return classes


def _check_folder_name(what: str, name: object) -> None:
    """Refuse a name that is empty, hidden, or would make more than one path component."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{what} {name!r} must not contain '/' or '\\' nor start with '.'")


def _check_arguments(
    train: int, test: int, seed: int, root: str, min_side: int, max_side: int, quality: int
) -> tuple[int, int, int, int, int, int]:
    """Validated counts, seed, sides and quality; ValueError naming the first bad one."""
    train = _integer("train_per_class", train, minimum=1)
    test = _integer("test_per_class", test, minimum=1)
    seed = _integer("seed", seed)
    _check_folder_name("root", root)
    # Below 16 pixels the motifs are unrecognisable blobs.
    min_side = _integer("min_side", min_side, minimum=16)
    max_side = _integer("max_side", max_side, minimum=min_side)
    quality = _integer("quality", quality, minimum=1)
    if quality > 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    return train, test, seed, min_side, max_side, quality


# --- archive -----------------------------------------------------------------------------


def _write_zip(
    f: io.BufferedWriter,
    classes: list[str],
    counts: dict[str, int],
    seed: int,
    root: str,
    sides: tuple[int, int],
    quality: int,
) -> None:
    """Render every image and store it, entries in sorted name order, with fixed metadata."""
    entries = []
    for split_index, split in enumerate(SPLITS):
        width = max(4, len(str(counts[split])))  # so that name order is number order
        for class_index, name in enumerate(classes):
            for i in range(1, counts[split] + 1):
                entry = f"{root}/{split}/{name}/{i:0{width}d}.jpg"
                entries.append((entry, (split_index, class_index, i)))
    motifs = [_class_motif(len(classes), index) for index in range(len(classes))]
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for entry, (split_index, class_index, i) in sorted(entries):
            rng = _image_rng(seed, split_index, class_index, i)
            data = _jpeg(_render_image(rng, motifs[class_index], *sides), quality)
            info = zipfile.ZipInfo(entry, date_time=_ZIP_DATE)
            info.create_system = 3  # Unix, whatever the platform, for identical bytes
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)


def _image_rng(seed: int, split_index: int, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image: independent streams per (seed, split, class, image)."""
    # SeedSequence takes non-negative entropy only, so the sign travels as its own word.
    return np.random.default_rng([abs(seed), int(seed < 0), split_index, class_index, index])


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- images ------------------------------------------------------------------------------


def _render_image(rng: np.random.Generator, motif: Motif, min_side: int, max_side: int) -> Image.Image:
    """One RGB image: textured background, distractors, the class motif, a few more distractors."""
    # Width and height are drawn independently, so some images are tall and some wide.
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    canvas = _background(rng, width, height)
    _clutter(canvas, rng, int(rng.integers(2, 5)), max_frac=0.16)
    motif(canvas, rng)
    # Distractors in front are kept small so that they rarely hide the motif.
    _clutter(canvas, rng, int(rng.integers(0, 3)), max_frac=0.08)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _class_motif(num_classes: int, class_index: int) -> Motif:
    """The drawing function of a class: hot dog / not hot dog, or a many-class motif."""
    if num_classes == 2:
        return _draw_hotdog if class_index == 0 else _draw_negative
    shape, hue, pattern, copies = _motif_of(class_index)
    return partial(_draw_class_motif, shape=shape, hue=hue, pattern=pattern, copies=copies)


def _motif_of(class_index: int) -> tuple[str, float, str, int]:
    """(shape, hue in degrees, pattern, copies) of many-class class ``class_index``.

    A bijection on each block of 256 classes, arranged so that neighbouring classes differ in
    shape and hue (classes 0-3 share neither); beyond 256 the number of copies tells them apart.
    """
    block, i = divmod(class_index, 256)
    shape = i % 8
    hue = (i // 8 + 3 * i) % 8  # for a fixed shape, i // 8 -> hue is one-to-one
    pattern = (i // 64 + i) % 4  # for a fixed (shape, hue), i // 64 -> pattern is one-to-one
    return MOTIF_SHAPES[shape], MOTIF_HUES[hue], MOTIF_PATTERNS[pattern], block + 1


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A float (height, width, 3) canvas: random colour, smooth blotches and fine grain."""
    base = np.array(_hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.6), rng.uniform(0.3, 0.95)))
    grid_h, grid_w = (int(v) for v in rng.integers(2, 7, size=2))
    blotches = base + rng.normal(0, rng.uniform(10, 40), size=(grid_h, grid_w, 3))
    small = Image.fromarray(np.clip(blotches, 0, 255).astype(np.uint8), "RGB")
    canvas = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32).copy()
    # Grey grain, like sensor noise (and a third of the cost of noise per channel).
    grain = rng.standard_normal((height, width, 1), dtype=np.float32)
    canvas += grain * np.float32(rng.uniform(3, 15))
    return canvas


def _clutter(canvas: np.ndarray, rng: np.random.Generator, count: int, max_frac: float) -> None:
    """Paint ``count`` small random shapes and lines of random colours."""
    height, width = canvas.shape[:2]
    side = min(width, height)
    for _ in range(count):
        colour = _random_colour(rng)
        if rng.random() < 0.35:
            ends = rng.uniform((0, 0), (width, height), size=(2, 2))
            thickness = int(rng.integers(1, max(2, side // 40) + 1))
            _paint(canvas, _line_mask(width, height, ends, thickness), colour)
            continue
        parts = _unit_shape(str(rng.choice(_CLUTTER_SHAPES)), rng)
        centre = rng.uniform((0, 0), (width, height))
        scale = side * rng.uniform(0.03, max_frac)
        _paint(canvas, _mask(width, height, parts, centre, scale, rng.uniform(0, math.tau)), colour)


def _placement(rng: np.random.Generator, canvas: np.ndarray, low: float, high: float):
    """Centre, scale (a fraction of the shorter side) and angle of a main object."""
    height, width = canvas.shape[:2]
    # Centres stay in the middle part so that the object is mostly inside the picture.
    centre = rng.uniform((0.3 * width, 0.3 * height), (0.7 * width, 0.7 * height))
    return centre, min(width, height) * rng.uniform(low, high), rng.uniform(0, math.tau)


def _draw_hotdog(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A bun (tan, elongated, rounded) holding a longer, thinner reddish-brown sausage."""
    height, width = canvas.shape[:2]
    centre, half_length, angle = _placement(rng, canvas, 0.3, 0.46)
    aspect = rng.uniform(2.0, 3.0)
    roundness = rng.choice((2.0, 2.6, 3.5))  # ellipse ... rounded rectangle
    bun = _superellipse(1.0, 1.0 / aspect, roundness)
    crust, crumb = _bun_colours(rng)
    _paint(canvas, _mask(width, height, [(bun, True)], centre, half_length, angle), crust)
    _paint(canvas, _mask(width, height, [(bun * 0.88, True)], centre, half_length, angle), crumb)
    sausage_half = rng.uniform(0.45, 0.6) / aspect
    sausage = _superellipse(rng.uniform(0.98, 1.12), sausage_half, 2.2)
    _paint(canvas, _mask(width, height, [(sausage, True)], centre, half_length, angle),
           _sausage_colour(rng))
    if rng.random() < 0.5:
        _draw_mustard(canvas, rng, centre, half_length, angle, sausage_half)


def _draw_mustard(canvas, rng, centre, half_length, angle, sausage_half) -> None:
    """A yellow zig-zag along the sausage."""
    height, width = canvas.shape[:2]
    x = np.linspace(-0.8, 0.8, 40)
    y = 0.6 * sausage_half * np.sin(x * math.pi * rng.uniform(2.0, 4.0) + rng.uniform(0, math.tau))
    points = _transform(np.stack([x, y], axis=1), centre, half_length, angle)
    thickness = max(1, int(round(half_length * sausage_half * 0.35)))
    yellow = _hsv(rng.uniform(48, 60), rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.0))
    _paint(canvas, _line_mask(width, height, points, thickness), yellow)


def _draw_negative(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Something that is not a hot dog, about as large; some share its colours."""
    height, width = canvas.shape[:2]
    kind = str(rng.choice(NEGATIVE_KINDS))
    centre, scale, angle = _placement(rng, canvas, 0.25, 0.42)
    if kind == "pizza":
        _draw_pizza(canvas, rng, centre, scale)
        return
    if kind == "sausage":  # the hard negative: the sausage without its bun
        parts = [(_superellipse(1.0, rng.uniform(0.15, 0.3), 2.2), True)]
        _paint(canvas, _mask(width, height, parts, centre, scale * 1.2, angle), _sausage_colour(rng))
        return
    mask = _mask(width, height, _unit_shape(kind, rng), centre, scale, angle)
    pattern = str(rng.choice(MOTIF_PATTERNS))
    _paint(canvas, mask, _fill(rng, pattern, _random_colour(rng), mask, scale))


def _draw_pizza(canvas, rng, centre, radius) -> None:
    """A tan crust disc, a red-orange sauce disc, a few dark red slices on it."""
    height, width = canvas.shape[:2]
    disc = _superellipse(1.0, 1.0, 2.0)
    crust, _ = _bun_colours(rng)
    _paint(canvas, _mask(width, height, [(disc, True)], centre, radius, 0.0), crust)
    sauce = _hsv(rng.uniform(5, 30), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.95))
    _paint(canvas, _mask(width, height, [(disc, True)], centre, radius * 0.85, 0.0), sauce)
    for _ in range(int(rng.integers(3, 8))):
        offset = rng.uniform(0, 0.6) * radius
        turn = rng.uniform(0, math.tau)
        spot = centre + offset * np.array([math.cos(turn), math.sin(turn)])
        _paint(canvas, _mask(width, height, [(disc, True)], spot, radius * 0.15, 0.0),
               _sausage_colour(rng))


def _draw_class_motif(canvas, rng, *, shape: str, hue: float, pattern: str, copies: int) -> None:
    """The many-class motif: ``copies`` objects of one shape, hue and fill pattern."""
    height, width = canvas.shape[:2]
    parts = _unit_shape(shape, rng)
    for _ in range(copies):
        centre, scale, angle = _placement(rng, canvas, 0.25, 0.42)
        scale /= math.sqrt(copies)
        colour = _hsv(hue + rng.uniform(-8, 8), rng.uniform(0.6, 0.95), rng.uniform(0.6, 0.95))
        mask = _mask(width, height, parts, centre, scale, angle)
        _paint(canvas, mask, _fill(rng, pattern, colour, mask, scale))


# --- drawing helpers ---------------------------------------------------------------------


def _unit_shape(name: str, rng: np.random.Generator) -> Parts:
    """The parts of a named shape in unit coordinates; ``blob`` and ``ellipse`` are random."""
    if name == "disc":
        return [(_superellipse(1.0, 1.0, 2.0), True)]
    if name in ("square", "triangle", "hexagon"):
        return [(_regular({"square": 4, "triangle": 3, "hexagon": 6}[name], 1.0), True)]
    if name == "star":
        radii = np.tile([1.0, 0.45], 5)
        return [(_polar(radii, np.linspace(0, math.tau, 10, endpoint=False)), True)]
    if name == "cross":
        a, b = 0.35, 1.0
        corners = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b)]
        right = np.array(corners)
        return [(np.concatenate([right, -right]), True)]
    if name == "ring":
        return [(_superellipse(1.0, 1.0, 2.0), True), (_superellipse(0.55, 0.55, 2.0), False)]
    if name == "crescent":
        return [(_superellipse(1.0, 1.0, 2.0), True),
                (_superellipse(0.85, 0.85, 2.0) + np.array([0.45, 0.0]), False)]
    if name == "blob":
        count = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, math.tau, count))
        return [(_polar(rng.uniform(0.55, 1.0, count), angles), True)]
    if name == "ellipse":
        return [(_superellipse(1.0, rng.uniform(0.3, 0.8), 2.0), True)]
    raise ValueError(f"unknown shape {name!r}")


def _superellipse(a: float, b: float, exponent: float, points: int = 48) -> np.ndarray:
    """Polygon of |x/a|^n + |y/b|^n = 1: an ellipse for n=2, a rounded rectangle for larger n."""
    t = np.linspace(0, math.tau, points, endpoint=False)
    cos, sin = np.cos(t), np.sin(t)
    x = a * np.sign(cos) * np.abs(cos) ** (2 / exponent)
    y = b * np.sign(sin) * np.abs(sin) ** (2 / exponent)
    return np.stack([x, y], axis=1)


def _regular(sides: int, radius: float) -> np.ndarray:
    angles = np.linspace(0, math.tau, sides, endpoint=False) - math.pi / 2
    return _polar(np.full(sides, radius), angles)


def _polar(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _transform(points: np.ndarray, centre, scale: float, angle: float) -> np.ndarray:
    """Unit-coordinate points rotated by ``angle``, scaled and moved to ``centre`` (pixels)."""
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, s], [-s, c]])
    return points @ rotation * scale + np.asarray(centre)


def _mask(width: int, height: int, parts: Parts, centre, scale: float, angle: float) -> np.ndarray:
    """Boolean (height, width) mask of a placed shape."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for polygon, keep in parts:
        points = _transform(polygon, centre, scale, angle)
        draw.polygon([tuple(p) for p in points.tolist()], fill=255 if keep else 0)
    return np.asarray(image) > 0


def _line_mask(width: int, height: int, points: np.ndarray, thickness: int) -> np.ndarray:
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).line([tuple(p) for p in points.tolist()], fill=255, width=thickness)
    return np.asarray(image) > 0


def _paint(canvas: np.ndarray, mask: np.ndarray, fill) -> None:
    """Paint a colour, or one colour per pixel of ``mask`` (from :func:`_fill`), where ``mask``."""
    canvas[mask] = np.asarray(fill, dtype=np.float32)


def _fill(rng, pattern: str, colour, mask: np.ndarray, scale: float):
    """A plain colour, or the colours of the masked pixels under a two-colour texture."""
    if pattern == "solid":
        return colour
    colour = np.asarray(colour, dtype=np.float32)
    second = colour * 0.4 if rng.random() < 0.6 else colour * 0.3 + 175
    period = max(4.0, scale * rng.uniform(0.35, 0.5))
    turn = rng.uniform(0, math.pi)
    # Only the masked pixels: the texture elsewhere would be thrown away.
    yy, xx = (axis.astype(np.float32) for axis in np.nonzero(mask))
    u = xx * math.cos(turn) + yy * math.sin(turn)
    v = -xx * math.sin(turn) + yy * math.cos(turn)
    if pattern == "stripes":
        other = (u / period) % 1.0 < 0.5
    elif pattern == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        other = du * du + dv * dv < (0.3 * period) ** 2
    elif pattern == "checker":
        other = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(other[:, None], second, colour)


def _hsv(hue_degrees: float, saturation: float, value: float) -> tuple[float, float, float]:
    """RGB in 0..255 of a hue in degrees (wrapping) and saturation, value in 0..1."""
    r, g, b = colorsys.hsv_to_rgb((hue_degrees % 360) / 360, saturation, value)
    return r * 255, g * 255, b * 255


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))


def _bun_colours(rng: np.random.Generator) -> tuple[tuple, tuple]:
    """A baked crust and a lighter crumb: tan to beige."""
    hue, saturation = rng.uniform(28, 42), rng.uniform(0.35, 0.6)
    value = rng.uniform(0.75, 0.95)
    return _hsv(hue, saturation + 0.15, value * 0.75), _hsv(hue, saturation, value)


def _sausage_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return _hsv(rng.uniform(2, 20), rng.uniform(0.6, 0.85), rng.uniform(0.45, 0.7))
