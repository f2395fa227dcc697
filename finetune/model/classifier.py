"""A trained classifier that carries its own preprocessing: the final checkpoint of a training
(network, class names, the config that made it) and how it turns any image into probabilities.

Evaluation, the promotion gate, `python -m finetune predict` and the served MLflow model all
score images through this module, so they agree to the last digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from finetune.core.config import ModelConfig
from finetune.core.errors import FinetuneError
from finetune.core.files import write_atomic
from finetune.data import portable
from finetune.data.portable import ImageError, decode_image, describe, eval_transform  # noqa: F401 (the model's API)
from finetune.model.factory import build_model


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


def probabilities(classifier: Classifier, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities, one row per image, in ``classifier.classes`` order."""
    return portable.probabilities(classifier.model, classifier.transform, images, len(classifier.classes), batch_size)
