"""The architectures the model factory builds: one row each, as plain names (no torch import),
so that params.yaml can be checked against it in milliseconds before any stage does work.

A row says everything the pipeline needs to know about a network: how to build it
(``torchvision.models.<builder>``) and its ImageNet weights (``torchvision.models.<imagenet>``),
its output layer (``head``: replaced by one with an output per class), the module whose input is
the backbone's features (``top``: what cached-feature training runs on those features), and its
blocks from the top, each with the attribute paths that make it up (what ``freeze`` and gradual
unfreezing walk down, and what params.yaml's ``unfreeze`` may name). finetune/model/factory.py
turns a row into a network and resolves its paths; finetune/train/strategy.py and features.py
read the row of the network they train.

Every row's ImageNet weights were trained on 224-pixel crops normalised with the ImageNet mean
and standard deviation, so params.yaml's one ``model:`` preprocessing fits every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One architecture: its builder and ImageNet weights, its output layer, and its blocks."""

    builder: str  # a function of torchvision.models
    imagenet: str  # <weights enum>.<member> of torchvision.models
    head: str  # attribute path of the output layer (a Linear) that build_model replaces
    # Attribute path of the last module forward() runs, the head inside it: its input is the
    # backbone's features (cached under a frozen backbone), and it runs in every head-only epoch.
    top: str
    # block name -> attribute paths of the modules that make it up, from the top: the head's block
    # first, then what gradual unfreezing walks down. Together they hold every parameter.
    parts: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        first = next(iter(self.parts.values()), ())
        if first != (self.head,):
            raise ValueError(f"{self.builder}: the first block must be the head {self.head!r} alone, not {first}")
        if not (self.head == self.top or self.head.startswith(self.top + ".")):
            raise ValueError(f"{self.builder}: the head {self.head!r} must be inside the top {self.top!r}")
        paths = [path for block in self.parts.values() for path in block]
        if len(paths) != len(set(paths)):
            raise ValueError(f"{self.builder}: a module is in two blocks: {paths}")

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block names from the top, the head's block first."""
        return tuple(self.parts)

    @property
    def unfreezable(self) -> tuple[str, ...]:
        """The blocks below the head, from the top: frozen at the start of ``freeze`` and
        ``gradual``, and what params.yaml's ``unfreeze`` may name (the head always trains)."""
        return self.blocks[1:]


def resnet(builder: str, imagenet: str) -> Arch:
    """A torchvision ResNet: the output layer ``fc``, then its four stages, then the stem."""
    stages = {name: (name,) for name in ("fc", "layer4", "layer3", "layer2", "layer1")}
    return Arch(builder, imagenet, head="fc", top="fc", parts=stages | {"stem": ("conv1", "bn1")})


def features(*indices: int) -> tuple[str, ...]:
    """Attribute paths of entries of a torchvision ``features`` Sequential."""
    return tuple(f"features.{i}" for i in indices)


# name -> architecture (timm style: one factory, the architecture chosen by name, one row each).
# The ImageNet weights: IMAGENET1K_V1 for resnet18 as in the D2L book, else torchvision's default.
ARCHS: dict[str, Arch] = {
    "resnet18": resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": resnet("resnet34", "ResNet34_Weights.DEFAULT"),
    "resnet50": resnet("resnet50", "ResNet50_Weights.DEFAULT"),
    # classifier = Linear(576, 1024), Hardswish, Dropout(0.2), Linear(1024, 1000): the head is the
    # last Linear; the hidden Linear is ImageNet-trained, so it belongs to the backbone (frozen at
    # first, unfrozen first). The features' stages by width: 16, 24, 40, 48, 96 channels, then the
    # 1x1 conv to 576 (last_conv).
    "mobilenet_v3_small": Arch(
        "mobilenet_v3_small", "MobileNet_V3_Small_Weights.DEFAULT", head="classifier.3", top="classifier",
        parts={"head": ("classifier.3",), "hidden": ("classifier.0",), "last_conv": features(12),
               "stage5": features(9, 10, 11), "stage4": features(7, 8), "stage3": features(4, 5, 6),
               "stage2": features(2, 3), "stage1": features(1), "stem": features(0)}),
    # classifier = Dropout(0.2), Linear(1280, 1000): the head is the Linear (the dropout before it
    # stays in the head's path, as in the Keras recipe). features: the stem, seven MBConv stages,
    # the 1x1 conv to 1280 (last_conv).
    "efficientnet_b0": Arch(
        "efficientnet_b0", "EfficientNet_B0_Weights.DEFAULT", head="classifier.1", top="classifier",
        parts={"head": ("classifier.1",), "last_conv": features(8),
               **{f"stage{i}": features(i) for i in range(7, 0, -1)}, "stem": features(0)}),
}


def unfreeze_problem(arch: str, plan: Mapping[int, str], key: str) -> str | None:
    """Why the gradual-unfreezing ``plan`` (params.yaml's ``key``: epoch -> block) names blocks
    that ``arch`` does not have, in one paragraph; None when it names only its blocks (or when
    ``arch`` is not a row: model.arch's own check says so)."""
    spec = ARCHS.get(arch)
    if spec is None:
        return None
    bad = sorted({block for block in plan.values() if block not in spec.unfreezable})
    if not bad:
        return None
    head = (f"; {spec.blocks[0]!r}, the new output layer, always trains" if spec.blocks[0] in bad else "")
    return (f"{key} {dict(plan)} names {', '.join(map(repr, bad))}, not a block below the head of model.arch "
            f"{arch}{head}. Its blocks from the top, which gradual unfreezing walks down, are "
            f"{', '.join(spec.unfreezable)}: name those in {key}, or change model.arch.")
