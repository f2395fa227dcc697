"""The ``train@<variant>`` stage: data → model → fit → outputs, tracked as a nested MLflow run.

Outputs (paths from dvc.yaml): ``<out>/model.pt`` (final weights, classes and the config that
made them), ``<out>/checkpoint.pt`` (per epoch, for resuming), a metrics JSON and per-epoch plot
data (CSV). The MLflow run is written to the checkpoint, so a rerun after a crash continues the
same run instead of leaving an orphan.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from finetune import distributed, plots, tracking
from finetune.classifier import save_final
from finetune.config import Params, TrainConfig
from finetune.data.archive import file_digest
from finetune.data.decoded import DecodedDataset, Sizes, cache_key, ensure_cache, tensor_train_transform
from finetune.data.images import eval_transform, load_splits, train_transform
from finetune.distributed import SINGLE, Dist
from finetune.files import write_atomic
from finetune.model import build_model
from finetune.train import (EpochStats, Runtime, fingerprint_of, fit, load_checkpoint, predict_all, resolve_runtime,
                            seed_everything, worker_count)

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainResult:
    """What a variant's training produced."""

    variant: str
    test_acc: float
    history: list[EpochStats]
    run_id: str
    model_path: Path


@dataclass(frozen=True)
class Paths:
    """Where a variant writes (from dvc.yaml), relative to the project."""

    out: Path
    metrics: Path
    plots: Path


def train_variant(params: Params, variant: str, paths: Paths, project: Path = Path(".")) -> TrainResult:
    """Train ``params.train[variant]`` on the validated files of ``data.dir``; write the outputs.

    Under torchrun every process trains its share; rank 0 alone logs to MLflow and writes."""
    cfg = params.train[variant]
    runtime = resolve_runtime(cfg)
    dist = distributed.start(runtime.device.type)
    try:
        runtime = _local_device(runtime, dist)
        if not dist.main:  # one voice: rank 0 logs progress and results
            logging.getLogger("finetune").setLevel(logging.WARNING)
        seed_everything(cfg.seed, cfg.deterministic)  # the same new head in every process
        return _train(params, variant, cfg, runtime, paths, project, dist)
    finally:
        distributed.stop(dist)


def _local_device(runtime: Runtime, dist: Dist) -> Runtime:
    """cuda → cuda:<local rank> under torchrun (one GPU per process)."""
    if not dist.active or runtime.device.type != "cuda":
        return runtime
    torch.cuda.set_device(dist.local_rank)
    return Runtime(torch.device("cuda", dist.local_rank), runtime.dtype, runtime.channels_last)


def _train(params: Params, variant: str, cfg: TrainConfig, runtime: Runtime, paths: Paths, project: Path,
           dist: Dist) -> TrainResult:
    train_loader, test_loader, classes = loaders(params, cfg, project / params.data.dir,
                                                 project / params.validate_.files, runtime.device.type == "cuda",
                                                 project, dist)
    weights = params.model.weights if cfg.init == "pretrained" else "none"
    model = build_model(params.model.arch, _weights_path(weights, project), len(classes))
    if dist.active:
        seed_everything(cfg.seed + dist.rank, cfg.deterministic)  # but other crops in each process
    settings = {"variant": variant, "train": cfg.model_dump(), "model": params.model.model_dump(mode="json"),
                "classes": classes, "weights": weights}
    version = tracking.data_version(project, params.data.dir)
    fingerprint = fingerprint_of(settings, version, file_digest(project / params.validate_.files, "sha256"),
                                 _weights_digest(weights, project))
    out = project / paths.out
    # Only an unfinished run of these settings resumes; a finished one is trained afresh.
    previous = _read_run_file(out, fingerprint)
    checkpoint = load_checkpoint(out, fingerprint) if previous else None
    commit = tracking.git_commit(project)
    test_ds, n_train = full_dataset(test_loader), len(full_dataset(train_loader))
    run = start_run(params, variant, out, fingerprint, project, previous, version, commit) if dist.main else nullcontext()
    with run as active:
        if dist.main:
            if checkpoint is None:
                log_setup(settings, cfg, version, commit, project, params, n_train, len(test_ds))
            mlflow.set_tags(tracking.runtime_tags(runtime.device, runtime.precision) | {"processes": str(dist.world)})
        extra = {"mlflow_run_id": active.info.run_id if dist.main else "", "settings": settings}
        history = fit(model, train_loader, test_loader, cfg, runtime, out, fingerprint=fingerprint,
                      checkpoint=checkpoint, extra=extra, on_epoch=log_epoch if dist.main else None, dist=dist)
        probs, truth = predict_all(model, test_loader, runtime, dist)
        test_acc = (probs.argmax(1) == truth).float().mean().item()
        model_path = out / "model.pt"
        if dist.main:
            save_final(model_path, model, classes, params.model.arch, settings, fingerprint=fingerprint,
                       mlflow_run_id=active.info.run_id, test_acc=test_acc)
            write_outputs(paths, project, history, test_acc, n_train, len(test_ds))
            log_results(model, history, test_ds, probs, truth, classes, params, project, paths)
            _write_run_file(out, fingerprint, active.info.run_id, complete=True)
    run_id = extra["mlflow_run_id"]
    log.info("%s: test accuracy %.3f after %d epochs (MLflow run %s)", variant, test_acc, cfg.epochs, run_id)
    return TrainResult(variant, test_acc, history, run_id, model_path)


def loaders(params: Params, cfg: TrainConfig, root: Path, files_csv: Path, pin: bool, project: Path = Path("."),
            dist: Dist = SINGLE):
    """Train (shuffled, augmented) and test loaders over the file list of ``root``; the classes.

    With ``cfg.decode_cache`` they read the decode cache (built here first if missing). Under
    torchrun each process gets a DistributedSampler share of train and the strided share
    ``rank, rank + world, ...`` of test, and ``batch_size / world`` images per step."""
    m = params.model
    train_ds, test_ds, classes = load_splits(
        root, files_csv, train_transform(m.train_crop), eval_transform(m.test_resize, m.test_crop, m.resize_mode))
    if cfg.decode_cache:
        train_ds, test_ds = decoded_splits(params, train_ds, test_ds, project, dist)
    workers = worker_count(cfg.workers)
    options = {"batch_size": max(1, cfg.batch_size // dist.world), "num_workers": workers, "pin_memory": pin,
               "persistent_workers": workers > 0}
    if not dist.active:
        return DataLoader(train_ds, shuffle=True, **options), DataLoader(test_ds, shuffle=False, **options), classes
    sampler = DistributedSampler(train_ds, dist.world, dist.rank, shuffle=True, seed=cfg.seed)
    test_share = Subset(test_ds, range(dist.rank, len(test_ds), dist.world))
    return DataLoader(train_ds, sampler=sampler, **options), DataLoader(test_share, **options), classes


def decoded_splits(params: Params, train_ds, test_ds, project: Path, dist: Dist = SINGLE):
    """The train and test datasets read from the decode cache (rank 0 builds it if missing)."""
    m = params.model
    sizes = Sizes(params.cache.short_side or m.test_resize, m.test_resize, m.test_crop, m.resize_mode)
    version = tracking.data_version(project, Path(os.path.relpath(train_ds.root, project)))
    folder = project / params.cache.dir / cache_key(train_ds, test_ds, sizes, version)
    if dist.main:
        workers = (os.cpu_count() or 1) if params.cache.workers == "auto" else params.cache.workers
        ensure_cache(folder, train_ds, test_ds, sizes, workers)
    dist.barrier()
    return (DecodedDataset(folder, "train", train_ds.labels, tensor_train_transform(m.train_crop)),
            DecodedDataset(folder, "test", test_ds.labels))


def full_dataset(loader: DataLoader):
    """The whole dataset behind ``loader`` (under torchrun the test loader reads a Subset)."""
    dataset = loader.dataset
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def start_run(params: Params, variant: str, out: Path, fingerprint: str, project: Path,
              previous: str | None, version: str, commit: str):
    """The variant's MLflow run: ``previous`` (the unfinished run of a resume), or a new one
    nested in the pipeline's parent run."""
    tracking.use_store(project)
    experiment = tracking.pipeline_experiment(params.data.dir, project)
    if previous:
        log.info("continuing MLflow run %s", previous)
        return mlflow.start_run(run_id=previous, log_system_metrics=True)
    key = tracking.pipeline_key(version, commit, params.model.model_dump(mode="json"),
                                {name: t.model_dump() for name, t in params.train.items()})
    parent = tracking.parent_run(experiment, key, {"data_version": version, "git_commit": commit})
    run = mlflow.start_run(experiment_id=experiment, run_name=variant, parent_run_id=parent,
                           log_system_metrics=True, tags={"variant": variant})
    # Written before the first epoch: a crash even then continues this run, not a new one.
    _write_run_file(out, fingerprint, run.info.run_id, complete=False)
    return run


def _write_run_file(out: Path, fingerprint: str, run_id: str, complete: bool) -> None:
    record = {"fingerprint": fingerprint, "mlflow_run_id": run_id, "complete": complete}
    write_atomic(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))


def _read_run_file(out: Path, fingerprint: str) -> str | None:
    """The MLflow run of an unfinished training with these settings, if there is one."""
    path = out / RUN_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint or record.get("complete"):
        return None
    return record["mlflow_run_id"]


def log_setup(settings, cfg: TrainConfig, version, commit, project, params: Params, n_train, n_test) -> None:
    """Params (every hyperparameter and group lr), data and code versions, the validation summary."""
    values = tracking.flatten("train", settings["train"]) | tracking.flatten("model", settings["model"])
    values |= {"variant": settings["variant"], "weights": settings["weights"], "data_version": version,
               "git_commit": commit, "classes": len(settings["classes"]),
               "train_images": n_train, "test_images": n_test, "lr.body": cfg.lr}
    if cfg.head_lr_mult is not None:
        values["lr.head"] = cfg.lr * cfg.head_lr_mult
    if cfg.strategy == "gradual":
        values["lr.unfrozen"] = cfg.lr * cfg.unfreeze_lr_mult
    mlflow.log_params(values)
    tracking.log_json(settings, "config.json")
    report = project / params.validate_.report
    if report.exists():
        summary = json.loads(report.read_text())
        mlflow.log_params({"validation.passed": summary.get("passed"), "validation.files": summary.get("files"),
                           "validation.used": summary.get("used"), "validation.quarantined": summary.get("quarantined")})
        mlflow.log_artifact(str(report), "validation")
    mlflow.log_artifact(str(project / "params.yaml"))


def log_epoch(stats: EpochStats) -> None:
    """Per-epoch metrics, step = epoch."""
    values = {"train_loss": stats.train_loss, "train_acc": stats.train_acc, "test_acc": stats.test_acc,
              "images_per_s": stats.images_per_s, "epoch_seconds": stats.seconds}
    values |= {f"lr_{group}": lr for group, lr in stats.lrs.items()}
    if stats.features_seconds:
        values["features_seconds"] = stats.features_seconds
    mlflow.log_metrics(values, step=stats.epoch)


def write_outputs(paths: Paths, project: Path, history: list[EpochStats], test_acc, n_train, n_test) -> None:
    """The metrics JSON (dvc metrics) and per-epoch plot data (dvc plots)."""
    last = history[-1]
    metrics = {"test_acc": test_acc, "train_acc": last.train_acc, "train_loss": last.train_loss,
               "epochs": len(history), "epoch_seconds": round(sum(s.seconds for s in history) / len(history), 2),
               "images_per_s": round(sum(s.images_per_s for s in history) / len(history), 1),
               "train_images": n_train, "test_images": n_test}
    write_atomic(project / paths.metrics, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    frame = pd.DataFrame([{k: v for k, v in asdict(s).items() if k != "lrs"} for s in history])
    write_atomic(project / paths.plots, lambda tmp: frame.to_csv(tmp, index=False))


def log_results(model, history, test_ds, probs, truth, classes, params: Params, project, paths: Paths) -> None:
    """Curves and prediction grid PNGs, the outputs, and the model with signature and example."""
    mlflow.log_metric("final_test_acc", (probs.argmax(1) == truth).float().mean().item())
    mlflow.log_figure(plots.curves(history), "curves.png")
    mlflow.log_figure(plots.prediction_grid(test_ds, probs, truth, classes), "predictions.png")
    mlflow.log_artifact(str(project / paths.metrics))
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    crop = params.model.test_crop
    example = np.zeros((1, 3, crop, crop), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                             metadata={"classes": classes, "arch": params.model.arch})


def _weights_path(weights: str, project: Path) -> str:
    return weights if weights in ("imagenet", "none") else str(project / weights)


def _weights_digest(weights: str, project: Path) -> str:
    """Changes when a local weights file changes (so does the fingerprint of the run)."""
    path = project / weights
    return file_digest(path, "sha256") if weights not in ("imagenet", "none") and path.exists() else weights
