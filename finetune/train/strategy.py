"""The strategy: which blocks train, at which learning rates, and when (the book's full fine-tune,
Keras' frozen backbone, and gradual unfreezing at a low lr). Small documented steps that ``fit``
composes, as fastai's ``fine_tune`` does. The head and the blocks are those of the network's own
row of ARCHS (finetune/model/archs.py), whatever its architecture.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from finetune.model.factory import arch_of, block_modules, head_of
from finetune.train.lr_groups import ALL, BODY, HEAD

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

# --- freezing -------------------------------------------------------------------------------------


def param_groups(model: nn.Module, lr: float, head_lr_mult: float | None) -> list[dict]:
    """Trainable parameters: ``body`` at ``lr`` and ``head`` at ``lr * head_lr_mult``, or one
    group ``all`` when ``head_lr_mult`` is None. Empty groups are left out."""
    output = head_of(model)
    head = [p for p in output.parameters() if p.requires_grad]
    head_ids = {id(p) for p in output.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    if head_lr_mult is None:
        groups = [{"name": ALL, "params": body + head, "lr": lr}]
    else:
        groups = [{"name": BODY, "params": body, "lr": lr},
                  {"name": HEAD, "params": head, "lr": lr * head_lr_mult}]
    return [g for g in groups if g["params"]]


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


def frozen_eval(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen into inference mode, with all inside it.

    Call after ``model.train()``: as the Keras transfer-learning guide warns, a frozen BatchNorm
    must keep normalising with its stored statistics and must not update them. More widely, a
    frozen block runs as the fixed function that Keras' ``training=False`` makes of a frozen base
    model (no stochastic depth or dropout inside it), the function cached features are computed
    with. A module without parameters (a dropout, an ``affine=False`` BatchNorm) is left as it is
    unless a frozen module holds it: nothing says it is frozen (the dropout before a new head
    keeps dropping, as in the Keras recipe).
    """
    params = list(model.parameters())
    if params and not any(p.requires_grad for p in params):
        model.eval()
        return
    for child in model.children():
        frozen_eval(child)


def train_mode(model: nn.Module) -> None:
    """``model.train()``, with the frozen modules (BatchNorm included) kept in inference mode."""
    model.train()
    frozen_eval(model)


# --- the optimiser, its schedule and the unfreezing plan -------------------------------------------


def initial_frozen(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Blocks of ``model`` frozen at the start: every block below the head for ``freeze`` and
    ``gradual``."""
    return list(arch_of(model).unfreezable) if cfg.strategy in ("freeze", "gradual") else []


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the trainable parameters: body at ``lr``, new head at ``lr * head_lr_mult``."""
    groups = [g | {"initial_lr": g["lr"]} for g in param_groups(model, cfg.lr, cfg.head_lr_mult)]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def schedule_factor(cfg: TrainConfig, epoch: int) -> float:
    """The lr multiplier of epoch ``epoch`` (1-based): 1, cosine (from 1 towards 0 over
    ``epochs``), or ``step_gamma`` per ``step_epochs`` epochs."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((epoch - 1) // cfg.step_epochs)
    return 1.0


def apply_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> None:
    """Set every group's lr for ``epoch``. A function of the epoch alone (not a torch scheduler,
    whose state breaks when gradual unfreezing adds groups), so a resume needs no extra state."""
    factor = schedule_factor(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def unfreeze_for_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> str | None:
    """``gradual``: at the start of epoch ``epoch`` (1-based) unfreeze the planned block and add
    it to the optimiser at ``lr * unfreeze_lr_mult`` (lower than the head's, as Keras advises)."""
    block = cfg.unfreeze.get(epoch) if cfg.strategy == "gradual" else None
    if block is None:
        return None
    unfreeze(model, [block])
    params = [p for p in block_params(model, block) if p.requires_grad]
    lr = cfg.lr * cfg.unfreeze_lr_mult
    optimizer.add_param_group({"name": block, "params": params, "lr": lr, "initial_lr": lr})
    return block


def block_params(model: nn.Module, block: str) -> list[nn.Parameter]:
    """Every parameter of block ``block``."""
    return [p for module in block_modules(model, block) for p in module.parameters()]


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's current lr, by group name."""
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}


# --- epochs whose backbone is frozen (trained on cached features) --------------------------------


def frozen_epochs(cfg: TrainConfig) -> int:
    """How many epochs from the first train only the head: all under freeze, those before the
    first unfreezing under gradual, none under full."""
    if cfg.strategy == "freeze":
        return cfg.epochs
    if cfg.strategy == "gradual":
        return min(cfg.unfreeze) - 1 if cfg.unfreeze else cfg.epochs
    return 0


def head_only(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` trains the head on cached features."""
    return cfg.cached_features and epoch <= frozen_epochs(cfg)


def feature_views(cfg: TrainConfig, epoch: int) -> int:
    """Views worth computing from ``epoch`` on: no more than the frozen epochs left."""
    return max(1, min(cfg.feature_views, frozen_epochs(cfg) - epoch + 1))
