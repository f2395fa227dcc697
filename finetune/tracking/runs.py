"""Training runs in MLflow: the variant's run (resumed after a crash), what it records before,
during (a :class:`MlflowCallback` handed to ``fit``) and after training; the source model's run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

from finetune.config import Params, TrainConfig
from finetune.errors import FinetuneError
from finetune.files import write_atomic
from finetune.tracking.store import (
    NOTE_TAG,
    SELECTION_TAG,
    experiment_id,
    flatten,
    log_json,
    parent_run,
    pipeline_experiment,
    pipeline_key,
    touch_parent,
    use_store,
)
from finetune.tracking.inputs import log_data
from finetune.tracking.packaging import MODEL_NAME, log_classifier, served_limits
from finetune.train.callbacks import Callback, EpochStats
from finetune.train.figures import curves, prediction_grid

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


# What a tracking server that is away (or refusing) raises through MLflow's client.
TRACKING_ERRORS = (MlflowException, requests.exceptions.RequestException)
MARKER = "train_loss"  # the metric whose logged steps say which epochs the run has
RETRY_S = 30.0  # while the server is away, ask again after this long (and at the end of training)
SINGLE_GROUP = "all"  # the parameter group of a variant with one lr (finetune/train/strategy.py)
BASE_GROUPS = (SINGLE_GROUP, "body")  # the group whose lr is `lr` (params and metrics), in every variant


class TrackingUnavailable(FinetuneError):
    """The tracking server did not answer by the end of training; the outputs are written."""


class ArtifactStoreError(FinetuneError):
    """The run's artifact store refused a file (permissions, a full disk, a file in the way)."""


def check_caught_up(callback: MlflowCallback, written: str) -> None:
    """After the outputs are written: a TrackingUnavailable naming the tracking URI when the run
    still misses epochs (the server stayed away to the end)."""
    if callback.behind:
        raise TrackingUnavailable(
            f"the MLflow tracking server {mlflow.get_tracking_uri()} was away to the end: run {callback.run_id} "
            f"misses epochs; {written} is written. Once the server answers, rerun `dvc repro`: it logs them "
            "from the checkpoint without training again.")


class MlflowCallback(Callback):
    """Per-epoch metrics into the active MLflow run (step = epoch, each step logged once), the
    curves at the end.

    While the tracking server is away training goes on: every epoch's record is in the
    checkpoint's history, so a failed log only notes that the run fell behind (one warning), and
    the epochs the run misses are logged when the server answers again (an epoch's end at least
    ``RETRY_S`` later, the end of training, or the rerun that resumes this run).
    ``history``: the epochs of a resumed checkpoint."""

    def __init__(self, history: Sequence[EpochStats] = ()) -> None:
        self.history = list(history)
        self.behind = False
        self.failed_at = 0.0
        self.run_id = ""
        self.curves_logged = False

    def on_epoch_end(self, stats: EpochStats) -> None:
        # An epoch repeated after a crash replaces its earlier record.
        self.history = [s for s in self.history if s.epoch < stats.epoch] + [stats]
        # Each try costs the bounded retries (seconds): not every epoch while the server is away.
        if not self.behind or time.monotonic() - self.failed_at >= RETRY_S:
            self.catch_up()

    def on_fit_end(self, history: list[EpochStats]) -> None:
        self.history = list(history)
        if self.catch_up():
            try:
                mlflow.log_figure(curves(history), "curves.png")
                self.curves_logged = True
            except TRACKING_ERRORS as err:
                self.fell_behind(err)
            except OSError as err:  # an artifact store that refuses: the train stage says so after its outputs
                log.warning("could not log curves.png: %s", err)

    def catch_up(self) -> bool:
        """Log the epochs the run misses; False (training goes on) when the server is away."""
        self.run_id = self.run_id or mlflow.active_run().info.run_id
        try:
            log_missing_epochs(self.run_id, self.history)
        except TRACKING_ERRORS as err:
            self.fell_behind(err)
            return False
        if self.behind:
            log.info("MLflow (%s) answers again: run %s has all %d epochs", mlflow.get_tracking_uri(),
                     self.run_id, len(self.history))
        self.behind = False
        return True

    def fell_behind(self, err: Exception) -> None:
        self.failed_at = time.monotonic()
        if not self.behind:  # one warning per outage, not one per epoch
            log.warning("MLflow (%s) does not answer (%s): training goes on, every epoch is in the "
                        "checkpoint, and the missing epochs are logged when it answers again",
                        mlflow.get_tracking_uri(), str(err).splitlines()[0][:200])
        self.behind = True


def log_missing_epochs(run_id: str, history: Sequence[EpochStats]) -> int:
    """Log the epochs of ``history`` whose step the run does not have yet; how many it logged.
    (A crash between an epoch's log and its checkpoint, or a resume, never logs a step twice.)"""
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, MARKER)}
    missing = [s for s in history if s.epoch not in logged]
    now = int(time.time() * 1000)
    for stats in missing:  # one request per epoch: all its metrics or none
        values = epoch_metrics(stats).items()
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, stats.epoch) for k, v in values])
    for failure in {s.failure for s in missing if s.failure}:  # e.g. collapsed: "1, 2" (never kept)
        client.set_tag(run_id, failure, ", ".join(str(s.epoch) for s in history if s.failure == failure))
    return len(missing)


def epoch_metrics(stats: EpochStats) -> dict[str, float]:
    """What MLflow records of an epoch: losses, accuracies (validation when there is a split; test
    only when asked for), speed and each group's lr."""
    # Validation first: the MLflow compare view plots the first metric a run logged against the
    # params (lr against validation accuracy).
    values = {name: value for name, value in (("val_acc", stats.val_acc), ("val_loss", stats.val_loss),
                                              ("test_acc", stats.test_acc)) if value is not None}
    values |= {"train_loss": stats.train_loss, "train_acc": stats.train_acc,
               "images_per_s": stats.images_per_s, "epoch_seconds": stats.seconds}
    values |= lr_metrics(stats.lrs)
    values["failed"] = 1.0 if stats.failure else 0.0  # diverged or collapsed (the run's tags say which)
    if stats.features_seconds:
        values["features_seconds"] = stats.features_seconds
    return values


def lr_metrics(lrs: dict[str, float]) -> dict[str, float]:
    """Each parameter group's lr: ``lr`` for the base rate (the one group ``all``, or the copied
    layers' ``body``), so that every variant has an ``lr`` to compare; ``lr_head``,
    ``lr_layer4``... for the others."""
    return {"lr" if group in BASE_GROUPS else f"lr_{group}": lr for group, lr in lrs.items()}


def training_run(params: Params, variant: str, out: Path, fingerprint: str, project: Path,
              previous: str | None, version: str, commit: str):
    """The variant's MLflow run: ``previous`` (the unfinished run of a resume), or a new one
    nested in the pipeline's parent run."""
    use_store(project)
    experiment = pipeline_experiment(params.data.dir, project)
    if previous:
        log.info("continuing MLflow run %s", previous)
        run = mlflow.start_run(run_id=previous, log_system_metrics=True)
        parent = run.data.tags.get("mlflow.parentRunId")
    else:
        key = pipeline_key(version, commit, params.model.model_dump(mode="json"),
                           {name: t.model_dump() for name, t in params.train.items()})
        parent = parent_run(experiment, key, {"data_version": version, "git_commit": commit})
        run = mlflow.start_run(experiment_id=experiment, run_name=variant, parent_run_id=parent,
                               log_system_metrics=True, tags={"variant": variant})
        # Written before the first epoch: a crash even then continues this run, not a new one.
        write_run_file(out, fingerprint, run.info.run_id, complete=False)
    if parent:
        touch_parent(parent, "RUNNING")
    return ended(run, parent)


@contextmanager
def ended(run, parent: str | None = None) -> Iterator:
    """``run`` as a context: ended FINISHED, or FAILED on an error, and its ``parent`` (the
    pipeline run) with it, so that the parent's end time covers it; a tracking server that is
    away then leaves them RUNNING (the rerun continues) rather than hiding the error."""
    try:
        yield run
    except BaseException:
        end_quietly(run.info.run_id, "FAILED", parent)
        raise
    end_quietly(run.info.run_id, "FINISHED", parent)


def end_quietly(run_id: str, status: str, parent: str | None = None) -> None:
    """End the active run (and ``parent`` with the same status, now); if the server does not
    answer, warn and stop its system metrics."""
    try:
        mlflow.end_run(status)
        if parent:
            touch_parent(parent, status)
    except TRACKING_ERRORS as err:
        log.warning("could not mark MLflow run %s %s (%s)", run_id, status, str(err).splitlines()[0][:200])
        monitor = run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor.finish()


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


def log_setup(settings, cfg: TrainConfig, version, commit, project, params: Params, n_train, n_val) -> None:
    """Params (every hyperparameter and group lr), data and code versions, the validation summary."""
    values = flatten("train", settings["train"]) | flatten("model", settings["model"])
    values |= {"variant": settings["variant"], "weights": settings["weights"], "data_version": version,
               "git_commit": commit, "classes": len(settings["classes"]),
               "train_images": n_train, "val_images": n_val}
    # Named as the groups train: `lr` the base rate of every variant (the body's, when the new
    # head has its own: `lr.head`), so that runs compare on one column.
    values["lr"] = cfg.lr
    if cfg.head_lr_mult is not None:
        values["lr.head"] = cfg.lr * cfg.head_lr_mult
    if cfg.strategy == "gradual":
        values["lr.unfrozen"] = cfg.lr * cfg.unfreeze_lr_mult
    run_id = mlflow.active_run().info.run_id
    # A run continued after a stop before its first epoch has its params already; MLflow refuses
    # to change one (the git commit moves when `make demo` refreshes its workspace): keep the first.
    logged = MlflowClient().get_run(run_id).data.params
    changed = sorted(k for k, v in values.items() if k in logged and logged[k] != str(v))
    if changed:
        log.warning("continuing run %s: params %s keep the values first logged", run_id, ", ".join(changed))
    mlflow.log_params({k: v for k, v in values.items() if k not in logged})
    log_data(run_id, params.data.url, params.data.dir, version, ("train", "validation") if n_val else ("train",))
    log_json(settings, "config.json")
    report = project / params.validate_.report
    if report.exists():
        summary = json.loads(report.read_text())
        mlflow.log_params({"validation.passed": summary.get("passed"), "validation.files": summary.get("files"),
                           "validation.used": summary.get("used"), "validation.quarantined": summary.get("quarantined")})
        mlflow.log_artifact(str(report), "validation")
    mlflow.log_artifact(str(project / "params.yaml"))


def log_cross_validated(val_acc: float) -> None:
    """``val_acc`` of a training that has no validation split (every train image trains): the
    cross-validated accuracy of the lr its search chose, as step 0, logged before any epoch so
    that MLflow's compare view plots lr against it as for the variants that have a split."""
    mlflow.log_metric("val_acc", float(val_acc), step=0)


def log_validation_files(path: Path) -> None:
    """The held-out validation files (path, class) a training watches, as an artifact."""
    mlflow.log_artifact(str(path), "validation")


def log_results(final: Path, val_ds, probs, truth, classes, params: Params, files: tuple[Path, Path],
                callback: MlflowCallback, selected: dict) -> None:
    """The kept epoch's scores (``selected``: val_acc, val_loss, selected_epoch, ...), the
    validation prediction grid PNG (when there is a split), the metrics file, the run's
    description, and the model ``final`` (model.pt) as the logged model that registration
    registers (finetune/tracking/packaging.py); each once, so a rerun after a failure logs only
    what is missing. ``files``: the metrics file and the params.yaml the model ships with.

    Raises :class:`TrackingUnavailable` when the tracking server is still away (the run misses
    epochs), :class:`ArtifactStoreError` when the artifact store refuses a file."""
    run_id, uri = callback.run_id, mlflow.get_tracking_uri()
    try:
        if callback.behind:  # on_fit_end has just asked
            raise MlflowException("no answer by the end of training")
        if not callback.curves_logged:
            mlflow.log_figure(curves(callback.history), "curves.png")
        run = MlflowClient().get_run(run_id)
        logged = run.data.metrics
        describe_run(run.data.tags.get("variant", ""), selected, params)
        kept = {f"selected.{k}": float(v) for k, v in selected.items()
                if v is not None and k != "stopped_early_at" and not isinstance(v, str)}
        if kept and not kept.keys() <= logged.keys():
            mlflow.log_metrics(kept)
        if probs is not None:
            mlflow.log_figure(prediction_grid(val_ds, probs, truth, classes), "predictions.png")
        metrics_file, params_file = files
        mlflow.log_artifact(str(metrics_file))
        if not model_logged(run_id):
            log_classifier(final, params_file, served_limits(params))
    except TRACKING_ERRORS as err:
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} is away or refusing ({str(err).splitlines()[0][:200]}); training "
            f"finished and wrote its checkpoint and model.pt, but run {run_id} misses epochs or results. "
            "Once the server answers, rerun `dvc repro`: it continues the same run and logs the rest "
            "without training again.") from None
    except OSError as err:
        location = err.filename or mlflow.get_artifact_uri()
        raise ArtifactStoreError(
            f"the MLflow artifact store could not write {location} ({err.strerror or err}); training finished "
            f"and wrote its checkpoint and model.pt. Make the artifact location of {uri} writable (check the "
            "folder's permissions, free disk space, remove a file that stands where a folder should be), "
            "then rerun `dvc repro`: it continues the same run and logs the rest.") from None


def selection_words(selected: dict, cfg: TrainConfig | None) -> str:
    """Which epoch's weights were kept and why, in words: "kept epoch 4 of 5 (best: validation
    accuracy 0.930)"; "kept epoch 5 of 5 (the last; no validation split)"."""
    epoch, trained = selected.get("selected_epoch"), selected.get("epochs_trained")
    words = f"kept epoch {epoch} of {trained}"
    stopped = f", early stopping after epoch {selected['stopped_early_at']}" if selected.get("stopped_early_at") else ""
    if selected.get("val_acc") is None:
        return f"{words} (the last; no validation split){stopped}"
    if selected.get("val_source") == "cross-validation":
        spread = f" ± {selected['val_acc_sd']:.3f}" if selected.get("val_acc_sd") is not None else ""
        return (f"{words} (every train image, the last epoch; the lr chosen by {selected.get('val_folds')}-fold "
                f"cross-validation: validation accuracy {selected['val_acc']:.3f}{spread})")
    how = "the last" if cfg is not None and cfg.select == "last" else "best"
    by = f"validation loss {selected['val_loss']:.4f}" if cfg is not None and cfg.monitor == "val_loss" \
        else f"validation accuracy {selected['val_acc']:.3f}"
    return f"{words} ({how}: {by}){stopped}"


def describe_run(variant: str, selected: dict, params: Params) -> None:
    """The run's description (what the MLflow UI shows first): the variant and the kept epoch;
    the evaluate stage puts the test accuracy in front (finetune/tracking/evaluation.py)."""
    words = selection_words(selected, params.train.get(variant))
    mlflow.set_tags({SELECTION_TAG: words, NOTE_TAG: f"{variant}: {words}; test accuracy after the evaluate stage"})


def model_logged(run_id: str) -> bool:
    """Whether the run already has its classifier (a failed upload leaves it not READY)."""
    return logged_model_uri(run_id) is not None


def logged_model_uri(run_id: str, name: str = MODEL_NAME) -> str | None:
    """``models:/<id>`` of the run's READY logged model ``name`` (the packaged classifier, which
    both ``mlflow.pyfunc.load_model`` and ``mlflow.pytorch.load_model`` read); None when it has none."""
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'",
                                        output_format="list")
    ready = [m for m in found if m.name == name and str(m.status).endswith("READY")]
    return f"models:/{ready[-1].model_id}" if ready else None


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run (e.g. the device it trains on)."""
    mlflow.set_tags(tags)


def pretrain_run(project: Path, dataset: str, cfg: TrainConfig, classes: int):
    """A run in the experiment ``pretrain-<dataset>`` with the source model's settings as params."""
    use_store(project)
    experiment = experiment_id(f"pretrain-{dataset}", project, (
        f"The source model (step 1 of the recipe): the network trained from scratch on the {dataset} data "
        "by the pretrain stage; model.weights: models/source/model.pt fine-tunes from it."))
    run = mlflow.start_run(experiment_id=experiment, run_name="pretrain", log_system_metrics=True)
    mlflow.log_params(flatten("pretrain", cfg.model_dump()) | {"classes": classes})
    return run
