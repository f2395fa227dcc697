"""One model factory keyed by name: the network, its starting weights, a new head, its blocks.

``build_model`` is steps 1–3 of the recipe: take the source model (ImageNet weights through
torchvision's weights API, a local state_dict, or none), keep every layer but the output layer,
and put a new, Xavier-initialised output layer with one output per class in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torchvision
from torch import nn

from finetune.errors import ConfigError, FinetuneError

log = logging.getLogger(__name__)

# name -> (builder, the ImageNet weights the recipe uses)
ARCHS: dict[str, tuple[Callable[..., nn.Module], object]] = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
}
# The blocks of a ResNet from the top: gradual unfreezing walks down this list.
BLOCKS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")


class WeightsError(FinetuneError):
    """The starting weights could not be had; the message says how to provide them."""


def build_model(arch: str, weights: str, num_classes: int) -> nn.Module:
    """``arch`` with ``weights`` (imagenet | none | path to a state_dict) and a new
    ``num_classes``-way output layer."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch {arch!r} is not known; use one of {sorted(ARCHS)}.")
    builder, imagenet = ARCHS[arch]
    if weights == "imagenet":
        model = _imagenet(builder, imagenet)
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


def _imagenet(builder, weights) -> nn.Module:
    """Through torchvision's own code: downloaded once into the torch hub cache, then offline."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return builder(weights=weights)
    except Exception as err:  # no network, proxy, a bad cache file: all end here
        raise WeightsError(
            f"Could not get the ImageNet weights from {weights.url} ({type(err).__name__}: {err}). "
            f"Download that file on a machine with network access and place it at {cached} (the "
            "torch hub cache; TORCH_HOME moves it), or set model.weights in params.yaml to a local "
            "state_dict file (torch.save(model.state_dict(), path))."
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
        raise WeightsError(f"{path} holds no state_dict (a mapping of names to tensors).")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit this model.arch: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}. Use weights saved from the same architecture.")
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


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but BatchNorm layers whose parameters are frozen stay in inference
    mode: as the Keras transfer-learning guide warns, their running statistics must not move."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
