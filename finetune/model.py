"""One model factory keyed by name: the network, its starting weights, a new head, its blocks.

``build_model`` is steps 1–3 of the recipe: take the source model (ImageNet weights through
torchvision's weights API, a local state_dict, or none), keep every layer but the output layer,
and put a new, Xavier-initialised output layer with one output per class in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.errors import ConfigError, FinetuneError

log = logging.getLogger(__name__)

# name -> torchvision builder (timm style: one factory, the architecture chosen by name)
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
# The ImageNet weights each uses: IMAGENET1K_V1 for resnet18 as in the D2L book, else the default.
IMAGENET: dict[str, WeightsEnum] = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.get_model_weights("resnet34").DEFAULT,
    "resnet50": torchvision.models.get_model_weights("resnet50").DEFAULT,
}
# The blocks of a ResNet from the top: gradual unfreezing walks down this list.
BLOCKS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")


class WeightsError(FinetuneError):
    """The starting weights could not be had; the message says how to provide them."""


def build_model(arch: str, weights: str, num_classes: int) -> nn.Module:
    """``arch`` with ``weights`` (imagenet | none | path to a state_dict) and a new
    ``num_classes``-way output layer."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch {arch!r} in params.yaml is not known; use one of {sorted(ARCHS)} "
                          "(or add a torchvision builder to ARCHS in finetune/model.py).")
    builder = ARCHS[arch]
    if weights == "imagenet":
        model = _imagenet(builder, IMAGENET[arch])
    else:
        model = builder(weights=None)
        if weights != "none":
            load_backbone(model, Path(weights))
    model.fc = new_head(model.fc.in_features, num_classes)
    return model


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The new output layer, initialised as in the book: Xavier-uniform weights, zero bias."""
    head = nn.Linear(in_features, num_classes)
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _imagenet(builder: Callable[..., nn.Module], weights: WeightsEnum) -> nn.Module:
    """Through torchvision's own code: downloaded once into the torch hub cache, then offline."""
    # Where torch.hub.load_state_dict_from_url looks before downloading (the URL's file name).
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        return builder(weights=weights)
    except Exception as err:  # no network, proxy, a bad cache file: all end here
        raise WeightsError(
            f"Could not get the ImageNet weights from {weights.url} ({type(err).__name__}: {err}). "
            f"Download that file on a machine with network access and place it at {cached} (the "
            "torch hub cache, replacing any broken file there; TORCH_HOME moves it), or set "
            "model.weights in params.yaml to a local state_dict file (torch.save(model.state_dict(), path))."
        ) from None


def load_backbone(model: nn.Module, path: Path) -> None:
    """Load a local state_dict (or a checkpoint holding one under ``model``) into every layer
    but the output layer, whose shape belongs to the source task."""
    if not path.is_file():
        raise WeightsError(f"model.weights file {path} does not exist. Fix the path in params.yaml, "
                           "or use imagenet or none.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a PyTorch state_dict ({type(err).__name__}: {err}). "
                           "Save one with torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state_dict (a mapping of names to tensors, or a checkpoint "
                           "with one under 'model'). Save one with torch.save(model.state_dict(), path).")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes
        reason = " ".join(str(err).split())  # torch's message spans lines; the error is one paragraph
        raise WeightsError(f"{path} does not fit this model.arch ({reason}). Use weights saved from the "
                           "same architecture, or fix model.arch / model.weights in params.yaml.") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit this model.arch: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Use weights saved from the same "
            "architecture, or fix model.arch / model.weights in params.yaml.")
    log.info("loaded %d tensors from %s (output layer left new)", len(state), path)


def param_groups(model: nn.Module, lr: float, head_lr_mult: float | None) -> list[dict]:
    """Trainable parameters: ``body`` at ``lr`` and ``head`` at ``lr * head_lr_mult``, or one
    group ``all`` when ``head_lr_mult`` is None. Empty groups are left out."""
    head = [p for p in model.fc.parameters() if p.requires_grad]
    head_ids = {id(p) for p in model.fc.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    if head_lr_mult is None:
        groups = [{"name": "all", "params": body + head, "lr": lr}]
    else:
        groups = [{"name": "body", "params": body, "lr": lr},
                  {"name": "head", "params": head, "lr": lr * head_lr_mult}]
    return [g for g in groups if g["params"]]


def block_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules of block ``name`` (see BLOCKS; ``stem`` is conv1 + bn1)."""
    if name == "stem":
        return [model.conv1, model.bn1]
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; blocks are {BLOCKS}")
    return [getattr(model, name)]


def freeze(model: nn.Module, names: Iterable[str]) -> None:
    """Stop gradients to the parameters of blocks ``names``."""
    _set_trainable(model, names, False)


def unfreeze(model: nn.Module, names: Iterable[str]) -> None:
    """Let blocks ``names`` train again."""
    _set_trainable(model, names, True)


def _set_trainable(model: nn.Module, names: Iterable[str], trainable: bool) -> None:
    for name in names:
        for module in block_modules(model, name):
            for param in module.parameters():
                param.requires_grad_(trainable)


def frozen_batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are all frozen into inference mode.

    Call after ``model.train()``: as the Keras transfer-learning guide warns, a frozen BatchNorm
    must keep normalising with its stored statistics and must not update them. A BatchNorm
    without parameters (``affine=False``) is left as it is: nothing says it is frozen.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def train_mode(model: nn.Module) -> None:
    """``model.train()``, with the frozen BatchNorm layers kept in inference mode."""
    model.train()
    frozen_batchnorm_eval(model)
