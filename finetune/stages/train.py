"""The ``train@<variant>`` stage: data → model → fit → outputs, tracked as one record (a nested MLflow
run, finetune/tracking/runs.py) that ``fit`` reports to as a callback.

Outputs (paths from dvc.yaml): ``<out>/model.pt`` (the kept epoch's weights, classes, the config
that made them, its validation scores), ``<out>/checkpoint.pt`` (for resuming, see
``checkpoint_every_s``; removed once the run is complete), ``<out>/validation.csv`` (the held-out
files it watched), a metrics JSON and per-epoch plot data (CSV). It never reads the test split unless ``test_each_epoch`` asks
for the book's plot. The MLflow run is written to ``<out>/run.json``, so a rerun after a crash
continues the same run instead of leaving an orphan.

`python -m finetune.stages.train <variant> --out models/<variant> --metrics metrics/train/<variant>.json
--plots plots/train/<variant>.csv`
"""

from __future__ import annotations

# First of all, while the `dvc repro` that started this process is surely alive: note it, so
# that killing it even during the imports below ends this stage (finetune/core/guard.py).
from finetune.core.guard import record_starter

record_starter(__name__)

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "train")

import argparse
import json
import logging
import subprocess
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from finetune.core import guard
from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params, TrainConfig, check_weights_file
from finetune.core.errors import ConfigError
from finetune.core.files import file_digest, fingerprint_of, write_atomic
from finetune.data.lineage import data_version, git_commit
from finetune.model.classifier import save_final
from finetune.model.factory import build_model, weights_digest, weights_path
from finetune.tracking import runs
from finetune.tracking.store import runtime_tags
from finetune.train import distributed
from finetune.train.callbacks import EpochStats
from finetune.train.checkpoints import load_checkpoint, remove_checkpoint
from finetune.train.distributed import Dist
from finetune.train.loaders import loaders
from finetune.train.loop import Fitted, fit, predict_all
from finetune.train.runtime import Runtime, resolve_runtime, seed_everything
from finetune.train.search import CROSS_VALIDATION, read_search, tuned

log = logging.getLogger(__name__)
VALIDATION_FILES = "validation.csv"


@dataclass(frozen=True)
class TrainResult:
    """What a variant's training produced (``val_acc``: the kept epoch's; None without validation)."""

    variant: str
    val_acc: float | None
    history: list[EpochStats]
    run_id: str
    model_path: Path


@dataclass(frozen=True)
class Paths:
    """Where a variant writes (from dvc.yaml), relative to the project."""

    out: Path
    metrics: Path
    plots: Path
    search: Path | None = None  # the search@<variant> stage's JSON (None: train with params.yaml's values)


def train_variant(params: Params, variant: str, paths: Paths, project: Path = Path(".")) -> TrainResult:
    """Train ``params.train[variant]`` on the validated files of ``data.dir``; write the outputs.

    Under torchrun every process trains its share; rank 0 alone logs to MLflow and writes."""
    search = read_search(project, paths.search, variant)
    cfg = tuned(params.train[variant], search)
    with guard.hold_folder(project / paths.out):  # one trainer per folder, or TrainingBusy at once
        runtime = resolve_runtime(cfg)
        dist = distributed.start(runtime.device.type)
        try:
            runtime = _local_device(runtime, dist)
            if not dist.main:  # one voice: rank 0 logs progress and results
                logging.getLogger("finetune").setLevel(logging.WARNING)
            seed_everything(cfg.seed, cfg.deterministic)  # the same new head in every process
            return _train(params, variant, cfg, runtime, paths, project, dist, search)
        finally:
            distributed.stop(dist)


def _local_device(runtime: Runtime, dist: Dist) -> Runtime:
    """cuda → cuda:<local rank> under torchrun (one GPU per process)."""
    if not dist.active or runtime.device.type != "cuda":
        return runtime
    torch.cuda.set_device(dist.local_rank)
    return Runtime(torch.device("cuda", dist.local_rank), runtime.dtype, runtime.channels_last)


def _train(params: Params, variant: str, cfg: TrainConfig, runtime: Runtime, paths: Paths, project: Path,
           dist: Dist, search: dict) -> TrainResult:
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files,
                   runtime.device.type == "cuda", project, dist, key=f"train.{variant}.val_fraction",
                   test=cfg.test_each_epoch)
    cfg = data.cfg  # batch_size / epochs: auto resolved for the images that train
    classes = data.classes
    weights = params.model.weights if cfg.init == "pretrained" else "none"
    model = build_model(params.model.arch, weights_path(weights, project), len(classes))
    if dist.active:
        seed_everything(cfg.seed + dist.rank, cfg.deterministic)  # but other crops in each process
    settings = {"variant": variant, "train": cfg.model_dump(), "model": params.model.model_dump(mode="json"),
                "classes": classes, "weights": weights}
    version, commit = data_version(project, params.data.dir), git_commit(project)
    fingerprint = fingerprint_of(settings, version, file_digest(project / params.validate_.files, "sha256"),
                                 weights_digest(weights, project))
    out = project / paths.out
    # Only an unfinished run of these settings resumes; a finished one is trained afresh.
    checkpoint = load_checkpoint(out, fingerprint) if runs.read_run_file(out, fingerprint) else None
    n_val = len(data.val_files)
    record = None  # under torchrun rank 0 alone records and writes
    if dist.main:
        write_validation_files(out, data.val_files)  # before the record, which logs the file
        seen = runs.VariantData(version, commit, data.train_images, n_val, out / VALIDATION_FILES,
                                search["val_acc"] if cross_validated(search) else None)
        record = runs.variant_record(params, settings, cfg, project, out, fingerprint, seen, runtime_tags(
            runtime.device, runtime.precision) | {"processes": str(dist.world)}, checkpoint)
    with record or nullcontext():
        fitted = fit(model, data, cfg, runtime, out, fingerprint=fingerprint, checkpoint=checkpoint,
                     extra={"settings": settings} | (record.checkpoint_extra() if record else {}),
                     callbacks=[record] if record else (), dist=dist, key=f"train.{variant}")
        # The kept weights once more on validation: the predictions picture (every process takes part).
        probs, truth = predict_all(model, data.val, runtime, dist) if data.val is not None else (None, None)
        if record:
            scores = selected_scores(fitted) | validation_score(search, fitted, n_val)
            save_final(out / "model.pt", model, classes, params.model.arch, settings, fingerprint=fingerprint,
                       mlflow_run_id=record.token, **scores)
            write_outputs(paths, project, fitted, scores, data.train_images, n_val, search)
            # The outputs first: a tracking outage or a refused artifact then costs no training (the
            # rerun resumes after the last epoch and logs only what the run misses).
            record.log_results(out / "model.pt", params, (project / paths.metrics, project / "params.yaml"), scores,
                               (data.val_set, probs, truth, classes) if probs is not None else None)
            remove_checkpoint(out)  # after the record: a crash in between leaves a complete run
    run_id = record.token if record else ""
    log.info("%s: %s (MLflow run %s)", variant, describe_selection(fitted, cfg), run_id)
    return TrainResult(variant, fitted.selected.val_acc, fitted.history, run_id, out / "model.pt")


def cross_validated(search: dict) -> bool:
    """Whether the variant's search chose its lr by k-fold cross-validation (no validation split)."""
    return bool(search.get("enabled")) and search.get("method") == CROSS_VALIDATION


def validation_score(search: dict, fitted: Fitted, n_val: int) -> dict:
    """What the variant is judged by before the test: its kept epoch on the validation split,
    or (after a cross-validated search, which leaves no split) the folds' mean and spread."""
    if cross_validated(search):
        return {"val_acc": search["val_acc"], "val_loss": search["val_loss"], "val_acc_sd": search["val_acc_sd"],
                "val_source": CROSS_VALIDATION, "val_folds": search["folds"], "val_images": search["val_images"],
                "lr": search["lr"]}
    if fitted.selected.val_acc is None:
        return {}
    return {"val_source": "validation", "val_images": n_val} | ({"lr": search["lr"]} if search.get("enabled") else {})


def selected_scores(fitted: Fitted) -> dict:
    """What model.pt, the metrics and the run record of the kept weights: validation loss and
    accuracy, the epoch, and where early stopping ended the training (None: it did not)."""
    chosen = fitted.selected
    return {"val_acc": chosen.val_acc, "val_loss": chosen.val_loss, "selected_epoch": chosen.epoch,
            "epochs_trained": len(fitted.history), "stopped_early_at": fitted.stopped_at}


def describe_selection(fitted: Fitted, cfg: TrainConfig) -> str:
    """One line: which epoch was kept, by what, out of how many."""
    chosen, trained = fitted.selected, len(fitted.history)
    stopped = f", early stopping after epoch {fitted.stopped_at}" if fitted.stopped_at else ""
    if chosen.val_acc is None:
        return f"epoch {chosen.epoch} of {trained} kept (no validation split){stopped}"
    how = f"best {cfg.monitor}" if cfg.select == "best" else "the last"
    return (f"validation accuracy {chosen.val_acc:.4f} (loss {chosen.val_loss:.4f}) at epoch {chosen.epoch} of "
            f"{trained}, {how}{stopped}")


def write_validation_files(out: Path, files: list[tuple[str, str]]) -> None:
    """``<out>/validation.csv``: the held-out files (path, class) this training watched."""
    frame = pd.DataFrame(files, columns=["path", "class"])
    write_atomic(out / VALIDATION_FILES, lambda tmp: frame.to_csv(tmp, index=False))


def write_outputs(paths: Paths, project: Path, fitted: Fitted, scores: dict, n_train: int, n_val: int,
                  search: dict | None = None) -> None:
    """The metrics JSON (dvc metrics: ``scores``, the kept epoch's, see selected_scores) and
    per-epoch plot data (dvc plots; after a cross-validated search, which leaves no split, the
    validation columns are the folds' mean curve at the chosen lr)."""
    history, last = fitted.history, fitted.history[-1]
    metrics = {k: v for k, v in scores.items() if v is not None and not isinstance(v, str)} | {
        "train_acc": last.train_acc, "images_per_s": round(sum(s.images_per_s for s in history) / len(history), 1),
        "train_images": n_train, "val_images": scores.get("val_images", n_val)}
    write_atomic(project / paths.metrics, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    frame = pd.DataFrame([{k: v for k, v in asdict(s).items() if k != "lrs"} for s in history])
    if search and search.get("method") == CROSS_VALIDATION:
        curve = pd.DataFrame(search["curve"])[["epoch", "val_acc", "val_loss"]]
        frame = frame.drop(columns=["val_acc", "val_loss"]).merge(curve, on="epoch", how="left")
    frame = frame.drop(columns=["val_classes"]).dropna(axis="columns", how="all")
    # test_acc only when asked for; val_* only with validation
    write_atomic(project / paths.plots, lambda tmp: frame.to_csv(tmp, index=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The variant and where its outputs go (from dvc.yaml)."""
    parser.add_argument("variant", help="a key under train: in params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt and checkpoints")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="per-epoch CSV to write")
    parser.add_argument("--search", type=Path, help="the search@<variant> stage's JSON (the chosen lr)")


def run(params: Params, args: argparse.Namespace) -> int | None:
    """Train one variant of train: (e.g. finetune, scratch) on the validated files."""
    guard.stop_with_starter()  # a killed `dvc repro` must not leave this process training
    if args.variant not in params.train:
        raise ConfigError(f"no variant {args.variant!r} under train: in params.yaml; have {sorted(params.train)}")
    if params.train[args.variant].init == "pretrained":  # as check_params_first (a no-op in-process)
        check_weights_file(params.model.weights, args.params.parent, must_exist=True)
    nproc = params.train[args.variant].nproc_per_node
    if nproc > 1 and not distributed.launched():
        # The same command again, in nproc processes under torchrun (this process only waits).
        command = distributed.torchrun_command(nproc, [
            "finetune.stages.train", "--params", str(args.params), args.variant, "--out", str(args.out),
            "--metrics", str(args.metrics), "--plots", str(args.plots),
            *(["--search", str(args.search)] if args.search else [])])
        print(f"train {args.variant}: DistributedDataParallel over {nproc} processes: {' '.join(command)}", flush=True)
        return subprocess.call(command)
    result = train_variant(params, args.variant, Paths(args.out, args.metrics, args.plots, args.search))
    if result.run_id:  # under torchrun rank 0 alone reports
        score = "no validation split" if result.val_acc is None else f"validation accuracy {result.val_acc:.4f}"
        print(f"{result.variant}: {score} -> {result.model_path} (MLflow run {result.run_id})")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
