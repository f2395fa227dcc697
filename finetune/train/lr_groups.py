"""The optimiser's learning-rate groups, named once: what each group is called in the optimiser,
and the param (its configured rate) and metric (its rate each epoch) that a training's record
shows it as.

A variant trains one group ``all`` (one lr), or ``body`` (the copied layers) and ``head`` (the new
output layer at lr x head_lr_mult); gradual unfreezing adds one group per block it unfreezes,
named after the block, all at lr x unfreeze_lr_mult (one param, ``lr.unfrozen``; one metric per
block, ``lr_layer4``...). The base rate (``all``, or ``body``) is ``lr`` in every variant's record,
so that runs compare on one column. Plain Python: the optimiser (finetune/train/strategy.py), the
loop and the tracking record (finetune/tracking/runs.py) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (bench --no-pipeline)
    from finetune.core.config import TrainConfig

ALL, BODY, HEAD = "all", "body", "head"  # the optimiser's group names (param_group["name"])
UNFROZEN = "unfrozen"  # the blocks gradual unfreezing adds, as one configured rate


@dataclass(frozen=True)
class LrGroup:
    """One group's names: in the optimiser, as a run's param, as a run's per-epoch metric."""

    name: str
    param: str
    metric: str


# The params keep MLflow's dotted names (lr.head); metrics an underscore (lr_head), as every
# run logged them so far: a renamed key would split the runs' columns in two.
TABLE = {group.name: group for group in (
    LrGroup(ALL, "lr", "lr"),
    LrGroup(BODY, "lr", "lr"),
    LrGroup(HEAD, "lr.head", "lr_head"),
    LrGroup(UNFROZEN, "lr.unfrozen", "lr_unfrozen"),
)}
BASE = TABLE[ALL]  # every variant's base rate: `lr`


def lr_group(name: str) -> LrGroup:
    """The names of group ``name``; a block that gradual unfreezing added (``layer4``) is
    ``lr.layer4`` / ``lr_layer4``."""
    return TABLE.get(name) or LrGroup(name, f"lr.{name}", f"lr_{name}")


def configured_lrs(cfg: TrainConfig) -> dict[str, float]:
    """Each group's configured rate before any schedule, by group name: the base rate, the head's
    (``head_lr_mult``), the rate of the blocks gradual unfreezing adds."""
    lrs = {ALL if cfg.head_lr_mult is None else BODY: cfg.lr}
    if cfg.head_lr_mult is not None:
        lrs[HEAD] = cfg.lr * cfg.head_lr_mult
    if cfg.strategy == "gradual":
        lrs[UNFROZEN] = cfg.lr * cfg.unfreeze_lr_mult
    return lrs


def lr_params(cfg: TrainConfig) -> dict[str, float]:
    """The run's params of the configured rates: ``lr``, ``lr.head``, ``lr.unfrozen``."""
    return {lr_group(name).param: lr for name, lr in configured_lrs(cfg).items()}


def lr_metrics(lrs: dict[str, float]) -> dict[str, float]:
    """An epoch's rates (group name -> lr, as EpochStats.lrs holds them) as the run's metrics:
    ``lr``, ``lr_head``, ``lr_layer4``..."""
    return {lr_group(name).metric: lr for name, lr in lrs.items()}
