"""Image bytes to class probabilities, in one file that imports nothing from this project (only
torch, torchvision, Pillow and numpy).

The project reads every image through it (finetune/data/images.py, finetune/model/classifier.py)
and evaluates with its one evaluation transform (:func:`eval_transform`, whose geometry
:func:`eval_crop` also makes the decode cache's test images and validation crops), and every
registered model ships a copy of it (MLflow ``code_paths``) beside its model code
(finetune/tracking/portable_model.py): the registered model then loads and predicts exactly as
``python -m finetune predict`` does, in any MLflow client with the model's requirements, where
this project is not installed. Keep it that way: no ``finetune`` import here.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Python object reprs that Pillow puts in its messages (``<_io.BytesIO object at 0x7f...>``):
# noise to a reader, and an address leaked to a server's client. (finetune/core/errors.py has the same
# pattern for the project's messages; this file may not import it.)
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An input is not an image the model can read; the message names it and says why."""

    def __init__(self, message: str) -> None:
        super().__init__(OBJECT_REPR.sub("", message))


def eval_crop(resize: int, crop: int, mode: str) -> v2.Compose:
    """The test transform's geometry, on a PIL image or a uint8 CHW tensor (the same type comes
    back): ``squash``: both sides to ``resize`` (the book); ``aspect``: the shorter side
    (torchvision); then CenterCrop(crop). The decode cache applies it to uint8 tensors, hence
    v2: it resizes those with torch's uint8 kernel (the classic transforms go through float), and
    PIL images exactly as the classic transforms do."""
    if mode == "squash":
        size = [resize, resize]
    elif mode == "aspect":
        size = resize
    else:
        raise ValueError(f"resize mode {mode!r}: use squash or aspect")
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(crop)])


def to_network_input() -> transforms.Compose:
    """A PIL image to what the network reads: float CHW in [0, 1], normalised with ImageNet statistics."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resize: int, crop: int, mode: str) -> transforms.Compose:
    """A PIL image as evaluation and prediction give it to the network: :func:`eval_crop`, then
    :func:`to_network_input`."""
    return transforms.Compose([eval_crop(resize, crop, mode), to_network_input()])


def load_image(path: Path | BinaryIO) -> Image.Image:
    """An RGB image (from a file or a binary stream) as a viewer shows it: EXIF rotation
    applied, any mode converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            image = sixteen_to_eight_bits(image)
        elif image.mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")  # as Pillow advises for palettes with transparency
        return image.convert("RGB")


def sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A grey 8-bit image from a 16-bit one (I;16*, or I as some Pillow versions read such PNGs).

    Pillow's own convert clips every value above 255 to white; keeping the top 8 bits scales
    0..65535 to 0..255. An ``I`` image whose values all fit in 8 bits is taken as it is.
    """
    array = np.asarray(image).astype(np.int64)
    if image.mode.startswith("I;16") or array.max() > 255:
        array = np.clip(array, 0, 65535) >> 8
    return Image.fromarray(array.astype(np.uint8), "L")


def decode_image(data: bytes, source: str, max_bytes: int, max_pixels: int,
                 pixels_setting: str = "validate.max_pixels") -> Image.Image:
    """An RGB image from encoded bytes (JPEG, PNG, ... any mode), checked before it is decoded:
    the byte size, then the width x height its header declares (``pixels_setting`` is the key
    that set ``max_pixels``, named in the message).

    Raises ImageError naming ``source`` for empty, oversized, unreadable or bomb-sized input.
    """
    if not data:
        raise ImageError(f"{source}: empty; send the bytes of a JPEG or PNG file.")
    if len(data) > max_bytes:
        raise ImageError(f"{source}: {len(data) / 2**20:.2f} MB is over the limit of {max_bytes / 2**20:.2f} MB "
                         "(serve.max_image_mb); send a smaller image.")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError as err:  # Pillow refuses twice its own limit outright
        raise ImageError(f"{source}: over the limit of {max_pixels} pixels ({pixels_setting}): {err} "
                         "Send a smaller image.") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{source}: not an image Pillow can read ({err}); send a JPEG, PNG, GIF, BMP or WebP.") from None
    if width * height > max_pixels:
        raise ImageError(f"{source}: {width}x{height} pixels is over the limit of {max_pixels} "
                         f"({pixels_setting}); send a smaller image.")
    try:
        return load_image(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{source}: the image data is broken ({err}); send the complete file.") from None


@torch.inference_mode()
def probabilities(network: torch.nn.Module, transform, images: Sequence[Image.Image], classes: int,
                  batch_size: int = 32) -> torch.Tensor:
    """Class probabilities of ``network`` (in eval mode), one row per image (``classes`` columns)."""
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]])
        rows.append(network(batch).float().softmax(1))
    return torch.cat(rows) if rows else torch.empty(0, classes)


def describe(classes: Sequence[str], probs: torch.Tensor) -> list[dict]:
    """``{"class", "confidence", "probabilities": {class: p}}`` per row of ``probs``."""
    results = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"class": classes[best], "confidence": row[best],
                        "probabilities": dict(zip(classes, row, strict=True))})
    return results
