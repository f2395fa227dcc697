"""The architectures the model factory builds: one row each, as plain names (no torch import),
so that params.yaml can be checked against it in milliseconds before any stage does work.

finetune/model/factory.py turns a row into a network: ``torchvision.models.<builder>`` with the
weights ``torchvision.models.<imagenet>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESNET_BLOCKS = ("fc", "layer4", "layer3", "layer2", "layer1", "stem")
RESNET_PARTS = {"stem": ("conv1", "bn1")}


@dataclass(frozen=True)
class Arch:
    """One architecture: its torchvision builder, its ImageNet weights, and its blocks from the
    top (the output layer first; gradual unfreezing walks down this list)."""

    builder: str  # a function of torchvision.models
    imagenet: str  # <weights enum>.<member> of torchvision.models
    blocks: tuple[str, ...] = RESNET_BLOCKS
    # block name -> attributes of the network that make it up (default: the attribute of that name)
    parts: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(RESNET_PARTS))


# name -> architecture (timm style: one factory, the architecture chosen by name, one row each).
# The ImageNet weights: IMAGENET1K_V1 for resnet18 as in the D2L book, else torchvision's default.
ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": Arch("resnet34", "ResNet34_Weights.DEFAULT"),
    "resnet50": Arch("resnet50", "ResNet50_Weights.DEFAULT"),
}
# The blocks every architecture here has (all are ResNets): what params.yaml's unfreeze may name.
BLOCKS = RESNET_BLOCKS
