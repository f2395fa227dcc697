"""The learning-rate search: every compared variant gets the same budget, and validation alone
chooses (the test split is never read here).

A variant's grid is ``n`` learning rates around its own (neighbours a factor ``search.lr_step``
apart, the lower side first). With a validation split of at least ``search.min_val_per_class``
images per class, each lr is one training watched by that split (``n = budget``). With a smaller
one, the split is too noisy to choose on: each lr is trained on ``search.folds`` stratified,
seeded folds of the train split (``n = budget // folds``), scored by the folds' mean validation
scores at the last epoch, as the final training on every train image will be used (it has no
split to choose an epoch by: finetune/stages/train.py applies :func:`tuned`).

A trial whose every epoch diverged or collapsed (finetune/train/health.py) is marked and never
chosen; a tie on validation accuracy goes to the lower validation loss, then to the lr nearer
the recipe's. Trials run in sequence, or ``search.workers`` at a time in processes of their own.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune.core.config import Params, TrainConfig
from finetune.core.errors import ConfigError, FinetuneError
from finetune.data.images import load_splits
from finetune.model.factory import build_model, weights_path
from finetune.train.health import COLLAPSED, DIVERGED, TrainingFailed
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.recipe import fit_recipe
from finetune.train.runtime import pick_device, resolve_runtime, seed_everything
from finetune.train.subsets import stratified_folds, validation_per_class

log = logging.getLogger(__name__)
VALIDATION, CROSS_VALIDATION = "validation", "cross-validation"


class SearchFailed(FinetuneError):
    """Every trial of a variant's search diverged or collapsed."""


@dataclass(frozen=True)
class Plan:
    """What a variant's search trains: ``lrs`` × ``folds`` trainings (1 fold: the validation split)."""

    method: str  # validation | cross-validation
    folds: int
    lrs: list[float]
    val_per_class: int  # the validation split's smallest class (what chose the method)
    batch_size: int  # the final training's (``auto`` resolved for it), used by every trial
    epochs: int


@dataclass
class Trial:
    """One learning rate's result: the kept epoch's validation scores (the folds' mean ± sd)."""

    lr: float
    val_acc: float | None
    val_loss: float | None
    val_acc_sd: float | None
    epoch: int | None  # the kept epoch; None when every epoch failed
    failure: str | None  # diverged | collapsed: never chosen
    val_images: int
    seconds: float
    curve: list[dict]  # per epoch: val_acc, val_loss, train_loss (folds' mean), failure
    fold_acc: list[float]  # each fold's val_acc at the kept epoch


def lr_grid(lr: float, n: int, step: float) -> list[float]:
    """``n`` learning rates ``step`` apart around ``lr`` (it included), the lower side first."""
    return [lr * step ** k for k in range(-(n // 2), (n - 1) // 2 + 1)]


def plan_search(params: Params, variant: str, labels: list[int]) -> Plan:
    """The method, folds and grid for ``variant`` given the train split's ``labels``."""
    cfg, search = params.train[variant], params.search
    per_class = validation_per_class(labels, cfg.val_fraction)
    kfold = cfg.val_fraction == 0 or per_class < search.min_val_per_class
    folds = search.folds if kfold else 1
    if search.budget < folds:
        raise ConfigError(f"search.budget ({search.budget}) is below search.folds ({folds}): the validation split of "
                          f"train.{variant} has {per_class} image(s) in its smallest class (below "
                          f"search.min_val_per_class, {search.min_val_per_class}), so each lr is cross-validated on "
                          "`folds` trainings. Raise search.budget or lower search.folds in params.yaml.")
    n_final = len(labels) if kfold else len(labels) - round(cfg.val_fraction * len(labels))
    final = fit_recipe(cfg, n_final, f"train.{variant}")
    return Plan(CROSS_VALIDATION if kfold else VALIDATION, folds, lr_grid(cfg.lr, search.budget // folds,
                search.lr_step), per_class, final.batch_size, final.epochs)


def fold_history(params: Params, variant: str, plan: Plan, lr: float, fold: int | None, project: Path,
                 device: str | None = None) -> tuple[list[dict], int]:
    """Train ``variant`` at ``lr`` on one fold (None: the validation split); (every epoch's stats
    as dicts, validation images). A training that failed returns its history all the same."""
    cfg = params.train[variant].model_copy(update={
        "lr": lr, "batch_size": plan.batch_size, "epochs": plan.epochs, "select": "best",
        "checkpoint_every_s": float("inf"), "nproc_per_node": 1} | ({"device": device} if device else {}))
    seed_everything(cfg.seed, cfg.deterministic)
    runtime = resolve_runtime(cfg)
    split = None
    if fold is not None:
        labels, classes = train_labels(params, project)
        split = stratified_folds(labels, plan.folds, cfg.seed, classes, "search.folds")[fold]
    key = f"train.{variant}.val_fraction"
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files,
                   runtime.device.type == "cuda", project, key=key, split=split)
    weights = params.model.weights if cfg.init == "pretrained" else "none"
    model = build_model(params.model.arch, weights_path(weights, project), len(data.classes))
    with tempfile.TemporaryDirectory(prefix="search-") as scratch:  # a trial does not resume
        try:
            history = fit(model, data, data.cfg, runtime, Path(scratch), fingerprint=f"search-{variant}-{lr}-{fold}",
                          key=f"train.{variant}").history
        except TrainingFailed as failed:
            history = failed.history
    return [asdict(s) for s in history], len(data.val_files)


def train_labels(params: Params, project: Path) -> tuple[list[int], list[str]]:
    """The train split's labels (in the file list's order) and class names; no image is read."""
    train, _, classes = load_splits(project / params.data.dir, project / params.validate_.files, None, None)
    return list(train.labels), classes


def mean_curve(histories: list[list[dict]]) -> list[dict]:
    """Per epoch that every fold reached: the folds' mean validation scores and train loss; the
    epoch failed when any fold's did."""
    reached = min(len(h) for h in histories)
    curve = []
    for i in range(reached):
        epochs = [h[i] for h in histories]
        failure = next((e["failure"] for e in epochs if e.get("failure")), None)
        curve.append({"epoch": i + 1, "val_acc": _mean(e["val_acc"] for e in epochs),
                      "val_loss": _mean(e["val_loss"] for e in epochs),
                      "train_loss": _mean(e["train_loss"] for e in epochs), "failure": failure})
    return curve


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def kept_epoch(curve: list[dict], select: str) -> int | None:
    """The epoch a training keeps from ``curve``: the best non-failed validation accuracy (a tie:
    the lower loss, then the later epoch) or, for ``select: last``, the last unless it failed."""
    if select == "last":
        return None if not curve or curve[-1]["failure"] else curve[-1]["epoch"]
    fine = [c for c in curve if not c["failure"] and c["val_acc"] is not None]
    if not fine:
        return None
    return max(fine, key=lambda c: (c["val_acc"], -(c["val_loss"] or 0.0), c["epoch"]))["epoch"]


def make_trial(lr: float, histories: list[list[dict]], val_images: int, seconds: float, select: str) -> Trial:
    """One lr's result from its folds' histories (one history: the validation split)."""
    curve = mean_curve(histories)
    epoch = kept_epoch(curve, select)
    if epoch is None:
        failures = {e.get("failure") for h in histories for e in h}
        failure = DIVERGED if DIVERGED in failures else COLLAPSED
        return Trial(lr, None, None, None, None, failure, val_images, seconds, curve, [])
    point = curve[epoch - 1]
    fold_acc = [h[epoch - 1]["val_acc"] for h in histories]
    sd = statistics.stdev(fold_acc) if len(fold_acc) > 1 else None
    return Trial(lr, point["val_acc"], point["val_loss"], sd, epoch, None, val_images, seconds, curve, fold_acc)


def choose(trials: list[Trial], recipe_lr: float) -> Trial | None:
    """The trial with the best validation accuracy (a tie: lower loss, then the lr nearer the
    recipe's); None when every trial failed."""
    fine = [t for t in trials if t.failure is None]
    if not fine:
        return None
    return max(fine, key=lambda t: (t.val_acc, -t.val_loss, -abs(math.log(t.lr / recipe_lr))))


def search_workers(setting: int | str, device: str) -> int:
    """Trials at once: ``auto`` is one per GPU on CUDA, else one per 4 CPU cores (at least one)."""
    if setting != "auto":
        return int(setting)
    if pick_device(device).type == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, (os.cpu_count() or 1) // 4)


def run_search(params: Params, variant: str, project: Path, plan: Plan,
               report: Callable[[Trial], None] = lambda trial: None) -> tuple[list[Trial], Trial]:
    """Train every (lr, fold) of ``plan`` (see plan_search); ``report`` gets each lr's trial as
    its folds finish. (trials in grid order, the chosen trial); SearchFailed when all failed."""
    cfg = params.train[variant]
    log.info("search %s: %s, %d lr(s) x %d fold(s): %s", variant, plan.method, len(plan.lrs), plan.folds,
             ", ".join(f"{lr:.3g}" for lr in plan.lrs))
    folds = [None] if plan.method == VALIDATION else list(range(plan.folds))
    # After cross-validation the final training has no split to choose an epoch by: it trains
    # every epoch and keeps the last. So each lr is scored as it will be used, by the folds' mean
    # at the last epoch (on small data the best epoch of a noisy curve is often an early fluke).
    keep = cfg.select if plan.method == VALIDATION else "last"
    tasks = [(lr, fold) for lr in plan.lrs for fold in folds]
    done: dict[float, list] = {lr: [] for lr in plan.lrs}
    trials: dict[float, Trial] = {}
    for (lr, fold), (history, n_val), seconds in _run_tasks(params, variant, plan, tasks, project, cfg.device):
        done[lr].append((fold, history, n_val, seconds))
        if len(done[lr]) == len(folds):
            parts = sorted(done[lr], key=lambda p: -1 if p[0] is None else p[0])
            trial = make_trial(lr, [p[1] for p in parts], sum(p[2] for p in parts), sum(p[3] for p in parts),
                               keep)
            trials[lr] = trial
            _log_trial(variant, trial)
            report(trial)
    ordered = [trials[lr] for lr in plan.lrs]
    chosen = choose(ordered, cfg.lr)
    if chosen is None:
        raise SearchFailed(
            f"search@{variant}: every learning rate tried ({', '.join(f'{t.lr:.3g} {t.failure}' for t in ordered)}) "
            f"diverged or collapsed, so no setting of train.{variant} learns on this data. Lower train.{variant}.lr "
            f"(the grid is centred on it) or widen search.lr_step, set train.{variant}.batch_size: auto and "
            f"train.{variant}.epochs: auto for small data, then rerun `dvc repro`.")
    return ordered, chosen


def _log_trial(variant: str, trial: Trial) -> None:
    if trial.failure:
        log.warning("search %s: lr %.3g %s (no epoch could be kept): never chosen", variant, trial.lr, trial.failure)
    else:
        spread = f" +- {trial.val_acc_sd:.3f}" if trial.val_acc_sd is not None else ""
        log.info("search %s: lr %.3g -> val_acc %.3f%s, val_loss %.4f (epoch %d)", variant, trial.lr,
                 trial.val_acc, spread, trial.val_loss, trial.epoch)


def _run_tasks(params: Params, variant: str, plan: Plan, tasks: list, project: Path, device: str):
    """Yield ((lr, fold), fold_history's result, seconds) as trainings finish: in this process
    one after another, or in ``search.workers`` processes at once (CPU threads shared out)."""
    workers = min(len(tasks), search_workers(params.search.workers, device))
    if workers <= 1:
        for lr, fold in tasks:
            started = time.perf_counter()
            yield (lr, fold), fold_history(params, variant, plan, lr, fold, project), time.perf_counter() - started
        return
    cuda = pick_device(device).type == "cuda"
    threads = max(1, (os.cpu_count() or 1) // workers)  # the cores shared out, not oversubscribed
    context = multiprocessing.get_context("spawn")  # torch and loader workers do not survive fork
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_timed, params, variant, plan, lr, fold, project,
                               f"cuda:{i % workers}" if cuda else None): (lr, fold)
                   for i, (lr, fold) in enumerate(tasks)}
        for future in as_completed(futures):
            result, seconds = future.result()
            yield futures[future], result, seconds


def _timed(params: Params, variant: str, plan: Plan, lr: float, fold: int | None, project: Path,
           device: str | None) -> tuple[tuple[list[dict], int], float]:
    started = time.perf_counter()
    return fold_history(params, variant, plan, lr, fold, project, device), time.perf_counter() - started


def search_document(variant: str, plan: Plan, trials: list[Trial], chosen: Trial) -> dict:
    """What the search stage writes (``search.out``/<variant>.json): the values train uses,
    the chosen trial's score and curve, and every trial's validation score."""
    return {"variant": variant, "enabled": True, "method": plan.method, "folds": plan.folds,
            "lr": chosen.lr, "epochs": plan.epochs, "batch_size": plan.batch_size,
            "val_acc": chosen.val_acc, "val_loss": chosen.val_loss, "val_acc_sd": chosen.val_acc_sd,
            "val_images": chosen.val_images, "val_per_class": plan.val_per_class,
            "curve": chosen.curve,
            "trials": [{k: v for k, v in asdict(t).items() if k != "curve"} for t in trials]}


def disabled_document(variant: str, cfg: TrainConfig) -> dict:
    """``search.enabled: false``: the variant's own values, recorded as such."""
    return {"variant": variant, "enabled": False, "lr": cfg.lr,
            "note": "search.enabled is false: the variant trains with its own lr (params.yaml)"}


def read_search(project: Path, path: Path | None, variant: str) -> dict:
    """The search@<variant> stage's choice ({} without one: params.yaml's values as written)."""
    if path is None:
        return {}
    file = project / path
    if not file.exists():
        raise ConfigError(f"{file} does not exist: the search@{variant} stage writes it (`dvc repro search@{variant}`; "
                          "with search.enabled: false it records the variant's own lr).")
    return json.loads(file.read_text())


def tuned(cfg: TrainConfig, document: dict) -> TrainConfig:
    """``cfg`` with the search's choice: its lr, batch size and epochs; after cross-validation
    also every train image (no validation split), the last epoch kept."""
    if not document.get("enabled"):
        return cfg
    update = {"lr": document["lr"], "batch_size": document["batch_size"], "epochs": document["epochs"]}
    if document["method"] == CROSS_VALIDATION:
        update |= {"val_fraction": 0.0, "select": "last", "early_stopping": None}
    return cfg.model_copy(update=update)
