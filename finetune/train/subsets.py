"""Which train images a run learns from: the validation split held out of the train split, and
the study's nested fractions of what remains. Both are stratified by class and fixed by a seed,
computed from labels alone (no images read), so every process and every rerun draws the same."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from finetune.core.errors import ConfigError


def _by_class(labels: Sequence[int], indices: Sequence[int], seed: int) -> dict[int, np.ndarray]:
    """``indices`` grouped by their label, each group shuffled by ``seed`` (sorted first, so the
    order of the file list does not matter)."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i in sorted(indices):
        groups.setdefault(labels[i], []).append(i)
    return {label: rng.permutation(np.array(members)) for label, members in sorted(groups.items())}


def split_validation(labels: Sequence[int], fraction: float, seed: int, classes: Sequence[str],
                     key: str) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): ``fraction`` of each class, rounded, held out.

    Raises ConfigError naming ``key`` when a class would get fewer than 2 validation images or
    none left to train on."""
    if fraction == 0:
        return list(range(len(labels))), []
    train, val = [], []
    for label, members in _by_class(labels, range(len(labels)), seed).items():
        held = round(fraction * len(members))
        if held < 2 or held >= len(members):
            raise ConfigError(
                f"{key}: {fraction} of class {classes[label]!r} ({len(members)} train images) is {held} "
                f"validation image(s); it needs at least 2 and must leave some to train on. Raise or lower "
                f"{key} in params.yaml (or set it to 0 to train without a validation split).")
        val.extend(members[:held].tolist())
        train.extend(members[held:].tolist())
    return sorted(train), sorted(val)


def nested_subset(labels: Sequence[int], indices: Sequence[int], fraction: float, seed: int) -> list[int]:
    """``fraction`` of each class of ``indices`` (at least one image per class), drawn by ``seed``
    so that for one seed a smaller fraction is always inside a larger one."""
    chosen: list[int] = []
    for members in _by_class(labels, indices, seed).values():
        chosen.extend(members[:max(1, math.ceil(fraction * len(members)))].tolist())
    return sorted(chosen)


def stratified_folds(labels: Sequence[int], k: int, seed: int, classes: Sequence[str],
                     key: str) -> list[tuple[list[int], list[int]]]:
    """``k`` (train indices, validation indices) pairs: each class dealt round-robin into ``k``
    folds after a shuffle by ``seed``, so every image validates exactly once and each fold holds
    every class in proportion. ConfigError naming ``key`` when a class has fewer than ``k`` images
    (a fold would miss it) or too few to leave two to train on."""
    groups = _by_class(labels, range(len(labels)), seed)
    small = {classes[label]: len(members) for label, members in groups.items() if len(members) < max(k, 3)}
    if small:
        raise ConfigError(f"{key}: {k}-fold cross-validation needs at least {max(k, 3)} train images per class; "
                          f"{small} have fewer. Lower {key} in params.yaml, or add images to those classes.")
    folds: list[tuple[list[int], list[int]]] = []
    for fold in range(k):
        val = sorted(i for members in groups.values() for i in members[fold::k].tolist())
        held = set(val)
        folds.append((sorted(i for i in range(len(labels)) if i not in held), val))
    return folds


def validation_per_class(labels: Sequence[int], fraction: float) -> int:
    """The fewest validation images any class gets from ``fraction`` (as split_validation holds out)."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return min(round(fraction * n) for n in counts.values()) if counts else 0
