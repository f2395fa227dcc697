"""A trained classifier that carries its own preprocessing: the final checkpoint of a training
(network, class names, the config that made it) and how it turns any image into probabilities.

Evaluation, the promotion gate, `python -m finetune predict` and the served MLflow model all
score images through this module, so they agree to the last digit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from finetune.config import ModelConfig
from finetune.data.images import eval_transform, load_image
from finetune.errors import FinetuneError
from finetune.files import write_atomic
from finetune.model.factory import build_model


class ImageError(FinetuneError):
    """An input is not an image this model can read; the message names it and says why."""


class CheckpointError(FinetuneError):
    """A model file is missing or is not a final checkpoint of the train stage."""


@dataclass
class Classifier:
    """A network in evaluation mode, its class names and its test-time preprocessing."""

    model: nn.Module
    classes: list[str]
    model_cfg: ModelConfig
    settings: dict
    info: dict  # the rest of the checkpoint: mlflow_run_id, fingerprint, test_acc, ...

    @property
    def transform(self):
        """The test transform the network was evaluated with (resize, center crop, ImageNet stats)."""
        m = self.model_cfg
        return eval_transform(m.test_resize, m.test_crop, m.resize_mode)


def save_final(path: Path, model: nn.Module, classes: list[str], arch: str, settings: dict, **extra) -> None:
    """Write the final checkpoint (CPU weights, classes, arch, the settings that made it) atomically."""
    final = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "classes": list(classes),
             "arch": arch, "settings": settings, **extra}
    write_atomic(path, lambda tmp: torch.save(final, tmp))


def read_final(path: Path) -> dict:
    """The final checkpoint at ``path`` as saved by save_final."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train the variant first (`dvc repro train`).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(f"{path} is not a readable checkpoint ({err}); train the variant again.") from None
    missing = {"model", "classes", "arch", "settings"} - set(state)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}: it is not a final model of the train stage.")
    return state


def load_classifier(path: Path) -> Classifier:
    """The classifier saved at ``path`` (a train stage's ``model.pt``), on the CPU, in eval mode."""
    state = read_final(path)
    model = build_model(state["arch"], "none", len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    info = {k: v for k, v in state.items() if k not in ("model", "classes", "settings")}
    return Classifier(model, list(state["classes"]), ModelConfig.model_validate(state["settings"]["model"]),
                      state["settings"], info)


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
def probabilities(classifier: Classifier, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities, one row per image, in ``classifier.classes`` order."""
    transform = classifier.transform
    rows = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]])
        rows.append(classifier.model(batch).float().softmax(1))
    return torch.cat(rows) if rows else torch.empty(0, len(classifier.classes))


def describe(classes: Sequence[str], probs: torch.Tensor) -> list[dict]:
    """``{"class", "confidence", "probabilities": {class: p}}`` per row of ``probs``."""
    results = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"class": classes[best], "confidence": row[best],
                        "probabilities": dict(zip(classes, row, strict=True))})
    return results
