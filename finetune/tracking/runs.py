"""Training runs in MLflow: the variant's run (resumed after a crash), what it records before,
during (a :class:`MlflowCallback` handed to ``fit``) and after training; the source model's run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import torch

from finetune.config import Params, TrainConfig
from finetune.files import write_atomic
from finetune.tracking.store import (
    experiment_id,
    flatten,
    log_json,
    parent_run,
    pipeline_experiment,
    pipeline_key,
    use_store,
)
from finetune.train.callbacks import Callback, EpochStats
from finetune.train.figures import curves, prediction_grid

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


class MlflowCallback(Callback):
    """Per-epoch metrics into the active MLflow run (step = epoch), the curves at the end."""

    def on_epoch_end(self, stats: EpochStats) -> None:
        mlflow.log_metrics(epoch_metrics(stats), step=stats.epoch)

    def on_fit_end(self, history: list[EpochStats]) -> None:
        mlflow.log_figure(curves(history), "curves.png")


def epoch_metrics(stats: EpochStats) -> dict[str, float]:
    """What MLflow records of an epoch: losses, accuracies, speed and each group's lr."""
    values = {"train_loss": stats.train_loss, "train_acc": stats.train_acc, "test_acc": stats.test_acc,
              "images_per_s": stats.images_per_s, "epoch_seconds": stats.seconds}
    values |= {f"lr_{group}": lr for group, lr in stats.lrs.items()}
    if stats.features_seconds:
        values["features_seconds"] = stats.features_seconds
    return values


def training_run(params: Params, variant: str, out: Path, fingerprint: str, project: Path,
              previous: str | None, version: str, commit: str):
    """The variant's MLflow run: ``previous`` (the unfinished run of a resume), or a new one
    nested in the pipeline's parent run."""
    use_store(project)
    experiment = pipeline_experiment(params.data.dir, project)
    if previous:
        log.info("continuing MLflow run %s", previous)
        return mlflow.start_run(run_id=previous, log_system_metrics=True)
    key = pipeline_key(version, commit, params.model.model_dump(mode="json"),
                       {name: t.model_dump() for name, t in params.train.items()})
    parent = parent_run(experiment, key, {"data_version": version, "git_commit": commit})
    run = mlflow.start_run(experiment_id=experiment, run_name=variant, parent_run_id=parent,
                           log_system_metrics=True, tags={"variant": variant})
    # Written before the first epoch: a crash even then continues this run, not a new one.
    write_run_file(out, fingerprint, run.info.run_id, complete=False)
    return run


def write_run_file(out: Path, fingerprint: str, run_id: str, complete: bool) -> None:
    """Record which MLflow run trains ``out`` with these settings, and whether it finished."""
    record = {"fingerprint": fingerprint, "mlflow_run_id": run_id, "complete": complete}
    write_atomic(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))


def read_run_file(out: Path, fingerprint: str) -> str | None:
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
    values = flatten("train", settings["train"]) | flatten("model", settings["model"])
    values |= {"variant": settings["variant"], "weights": settings["weights"], "data_version": version,
               "git_commit": commit, "classes": len(settings["classes"]),
               "train_images": n_train, "test_images": n_test, "lr.body": cfg.lr}
    if cfg.head_lr_mult is not None:
        values["lr.head"] = cfg.lr * cfg.head_lr_mult
    if cfg.strategy == "gradual":
        values["lr.unfrozen"] = cfg.lr * cfg.unfreeze_lr_mult
    mlflow.log_params(values)
    log_json(settings, "config.json")
    report = project / params.validate_.report
    if report.exists():
        summary = json.loads(report.read_text())
        mlflow.log_params({"validation.passed": summary.get("passed"), "validation.files": summary.get("files"),
                           "validation.used": summary.get("used"), "validation.quarantined": summary.get("quarantined")})
        mlflow.log_artifact(str(report), "validation")
    mlflow.log_artifact(str(project / "params.yaml"))


def log_results(model, test_ds, probs, truth, classes, params: Params, metrics_file: Path) -> None:
    """The final test accuracy, the prediction grid PNG, the metrics file, and the model with
    signature and example."""
    mlflow.log_metric("final_test_acc", (probs.argmax(1) == truth).float().mean().item())
    mlflow.log_figure(prediction_grid(test_ds, probs, truth, classes), "predictions.png")
    mlflow.log_artifact(str(metrics_file))
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    crop = params.model.test_crop
    example = np.zeros((1, 3, crop, crop), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                             metadata={"classes": classes, "arch": params.model.arch})


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run (e.g. the device it trains on)."""
    mlflow.set_tags(tags)


def pretrain_run(project: Path, dataset: str, cfg: TrainConfig, classes: int):
    """A run in the experiment ``pretrain-<dataset>`` with the source model's settings as params."""
    use_store(project)
    experiment = experiment_id(f"pretrain-{dataset}", project)
    run = mlflow.start_run(experiment_id=experiment, run_name="pretrain", log_system_metrics=True)
    mlflow.log_params(flatten("pretrain", cfg.model_dump()) | {"classes": classes})
    return run
