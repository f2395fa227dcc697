"""The ``train@<variant>`` stage: data → model → fit → outputs, tracked as a nested MLflow run.

Outputs (paths from dvc.yaml): ``<out>/model.pt`` (final weights, classes and the config that
made them), ``<out>/checkpoint.pt`` (per epoch, for resuming), a metrics JSON and per-epoch plot
data (CSV). The MLflow run is written to ``<out>/run.json``, so a rerun after a crash continues
the same run instead of leaving an orphan.

`python -m finetune.stages.train <variant> --out models/<variant> --metrics metrics/train/<variant>.json
--plots plots/train/<variant>.csv`
"""

from __future__ import annotations

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.command import check_params_first

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

from finetune.command import stage_main
from finetune.config import Params, TrainConfig, check_weights_file
from finetune.data.lineage import data_version, git_commit
from finetune.errors import ConfigError
from finetune.files import file_digest, fingerprint_of, write_atomic
from finetune.model.classifier import save_final
from finetune.model.factory import build_model, weights_digest, weights_path
from finetune.tracking import runs
from finetune.tracking.store import runtime_tags
from finetune.train import distributed, guard
from finetune.train.callbacks import EpochStats
from finetune.train.checkpoints import load_checkpoint
from finetune.train.distributed import Dist
from finetune.train.loaders import full_dataset, loaders
from finetune.train.loop import fit, predict_all
from finetune.train.runtime import Runtime, resolve_runtime, seed_everything

log = logging.getLogger(__name__)


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
    with guard.hold_folder(project / paths.out):  # one trainer per folder, or TrainingBusy at once
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
    previous = runs.read_run_file(out, fingerprint)
    checkpoint = load_checkpoint(out, fingerprint) if previous else None
    test_ds, n_train = full_dataset(test_loader), len(full_dataset(train_loader))
    run = runs.training_run(params, variant, out, fingerprint, project, previous, version,
                            commit) if dist.main else nullcontext()
    with run as active:
        run_id = active.info.run_id if dist.main else ""
        if dist.main:
            if checkpoint is None:
                runs.log_setup(settings, cfg, version, commit, project, params, n_train, len(test_ds))
            runs.set_tags(runtime_tags(runtime.device, runtime.precision) | {"processes": str(dist.world)})
        tracker = runs.MlflowCallback([EpochStats(**s) for s in checkpoint["history"]] if checkpoint else ())
        history = fit(model, train_loader, test_loader, cfg, runtime, out, fingerprint=fingerprint,
                      checkpoint=checkpoint, extra={"mlflow_run_id": run_id, "settings": settings},
                      callbacks=[tracker] if dist.main else (), dist=dist)
        probs, truth = predict_all(model, test_loader, runtime, dist)
        test_acc = (probs.argmax(1) == truth).float().mean().item()
        if dist.main:
            save_final(out / "model.pt", model, classes, params.model.arch, settings, fingerprint=fingerprint,
                       mlflow_run_id=run_id, test_acc=test_acc)
            write_outputs(paths, project, history, test_acc, n_train, len(test_ds))
            # The outputs first: a tracking outage or a refused artifact then costs no training (the
            # rerun resumes after the last epoch and logs only what the run misses).
            runs.log_results(model, test_ds, probs, truth, classes, params, project / paths.metrics, tracker)
            runs.write_run_file(out, fingerprint, run_id, complete=True)
    log.info("%s: test accuracy %.3f after %d epochs (MLflow run %s)", variant, test_acc, cfg.epochs, run_id)
    return TrainResult(variant, test_acc, history, run_id, out / "model.pt")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The variant and where its outputs go (from dvc.yaml)."""
    parser.add_argument("variant", help="a key under train: in params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt and checkpoints")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="per-epoch CSV to write")


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
            "--metrics", str(args.metrics), "--plots", str(args.plots)])
        print(f"train {args.variant}: DistributedDataParallel over {nproc} processes: {' '.join(command)}", flush=True)
        return subprocess.call(command)
    result = train_variant(params, args.variant, Paths(args.out, args.metrics, args.plots))
    if result.run_id:  # under torchrun rank 0 alone reports
        print(f"{result.variant}: test accuracy {result.test_acc:.4f} -> {result.model_path} "
              f"(MLflow run {result.run_id})")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
