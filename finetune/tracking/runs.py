"""Training runs in MLflow, each kept by one :class:`TrainingRecord` (in the spirit of Lightning's
``Logger``): a context that opens the run, or continues the one a crash left unfinished, and logs
its setup (params, every group's lr, tags, data inputs, files); the callback ``fit`` reports
every epoch to; and, for a variant, the results and the logged model at the end. A checkpoint
keeps only the record's opaque resume token (``TOKEN``), which the record reads back.

The variant's record (:func:`variant_record`, the train stage) and the source model's
(:func:`pretrain_record`); the study's trainings: finetune/tracking/study.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

from finetune.core.config import Params, TrainConfig
from finetune.core.errors import FinetuneError
from finetune.core.files import write_atomic
from finetune.tracking.inputs import dataset_input
from finetune.tracking.packaging import MODEL_NAME, log_classifier, served_limits
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
from finetune.train.callbacks import Callback, EpochStats
from finetune.train.checkpoints import stored_for_watchers
from finetune.train.figures import curves, prediction_grid
from finetune.train.lr_groups import lr_metrics, lr_params

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TOKEN = "tracking"  # the checkpoint's extra entry that names the run a resumed training continues


# What a tracking server that is away (or refusing) raises through MLflow's client.
TRACKING_ERRORS = (MlflowException, requests.exceptions.RequestException)
MARKER = "train_loss"  # the metric whose logged steps say which epochs the run has
RETRY_S = 30.0  # while the server is away, ask again after this long (and at the end of training)


class TrackingUnavailable(FinetuneError):
    """The tracking server did not answer by the end of training; the outputs are written."""


class ArtifactStoreError(FinetuneError):
    """The run's artifact store refused a file (permissions, a full disk, a file in the way)."""


@dataclass(frozen=True)
class Where:
    """Where a new run goes: its experiment, and the run it is nested under (None: none)."""

    experiment: str
    parent: str | None = None


@dataclass(frozen=True)
class Setup:
    """What a run records before its first epoch (not again when it resumes a checkpoint): params
    (a value logged before is kept), data inputs (MLflow DatasetInputs), JSON documents (name ->
    content), files ((path, folder in the run or None)), and metrics at step 0. ``tags`` are set
    whenever the run starts: a resumed run says what it continued on."""

    params: dict[str, object] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    inputs: tuple = ()
    documents: dict[str, dict] = field(default_factory=dict)
    files: tuple[tuple[Path, str | None], ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFile:
    """``<out>/run.json``: which run trains ``out`` with the settings ``fingerprint``, and
    whether it finished (only an unfinished run of the same settings is continued)."""

    out: Path
    fingerprint: str

    def write(self, run_id: str, complete: bool) -> None:
        write_run_file(self.out, self.fingerprint, run_id, complete)

    def unfinished(self) -> str | None:
        return read_run_file(self.out, self.fingerprint)


class TrainingRecord(Callback):
    """One training's run, start to end (a context manager and ``fit``'s callback).

    Entering opens the run (``resume``: the id of one to continue; else a new one named ``name``
    where ``where()`` says, its id written to ``run_file`` before the first epoch so that even an
    early crash continues it), sets the setup's tags and logs the rest of its setup unless it
    resumes a checkpoint (``history``: its epochs); leaving ends it FINISHED, or FAILED on an
    error, and with ``pipeline`` its parent (the pipeline run) with it, so that the parent's end
    time covers it. A tracking server that is away then leaves them RUNNING (the rerun continues)
    rather than hiding the error.

    Per-epoch metrics go in as the loop reports them (step = epoch, each step logged once), the
    curves at the end. While the tracking server is away training goes on: every epoch's record
    is in the checkpoint's history, so a failed log only notes that the run fell behind (one
    warning), and the epochs the run misses are logged when the server answers again (an epoch's
    end at least ``RETRY_S`` later, the end of training, or the rerun that resumes this run)."""

    def __init__(self, project: Path, name: str, where: Callable[[], Where], *, setup: Setup | None = None,
                 resume: str | None = None, history: Sequence[EpochStats] = (), run_file: RunFile | None = None,
                 pipeline: bool = False, system_metrics: bool = True) -> None:
        self.project, self.name, self.where, self.setup = project, name, where, setup or Setup()
        self.resume, self.run_file, self.pipeline, self.system_metrics = resume, run_file, pipeline, system_metrics
        self.history = list(history)
        self.run_id, self.parent, self.active = "", None, False
        self.behind, self.failed_at, self.curves_logged = False, 0.0, False

    @property
    def token(self) -> str:
        """The run's id: what a checkpoint keeps (:meth:`checkpoint_extra`) to continue it."""
        return self.run_id

    def checkpoint_extra(self) -> dict[str, str]:
        """The entry a checkpoint of this training carries, read back by :func:`resume_token`."""
        return {TOKEN: self.run_id}

    def __enter__(self) -> TrainingRecord:
        use_store(self.project)
        fresh = self._start()
        self.active = True
        try:
            if fresh or not self.history:
                self._log_setup()
        except BaseException:
            self.__exit__(BaseException, None, None)
            raise
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if self.active:
            self.active = False
            end_quietly(self.run_id, "FINISHED" if kind is None else "FAILED",
                        self.parent if self.pipeline else None)
        return False

    def _start(self) -> bool:
        """Open the run; whether it is new (a run to continue that the store lost is replaced)."""
        if self.resume and resumable(self.resume):
            log.info("continuing MLflow run %s", self.resume)
            run = mlflow.start_run(run_id=self.resume, log_system_metrics=self.system_metrics, tags=self.setup.tags)
            self.run_id, self.parent = run.info.run_id, run.data.tags.get("mlflow.parentRunId")
            fresh = False
        else:
            where = self.where()
            run = mlflow.start_run(experiment_id=where.experiment, run_name=self.name, parent_run_id=where.parent,
                                   log_system_metrics=self.system_metrics, tags=self.setup.tags)
            self.run_id, self.parent = run.info.run_id, where.parent
            if self.run_file is not None:  # before the first epoch: a crash even then continues this run
                self.run_file.write(self.run_id, complete=False)
            fresh = True
        if self.pipeline and self.parent:
            touch_parent(self.parent, "RUNNING")
        return fresh

    def _log_setup(self) -> None:
        """The setup's params (those logged before keep their values), inputs, files and metrics."""
        client, setup = MlflowClient(), self.setup
        # A run continued after a stop before its first epoch has its params already; MLflow refuses
        # to change one (the git commit moves when `make demo` refreshes its workspace): keep the first.
        logged = client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in setup.params.items() if k in logged and logged[k] != str(v))
        if changed:
            log.warning("continuing run %s: params %s keep the values first logged", self.run_id, ", ".join(changed))
        mlflow.log_params({k: v for k, v in setup.params.items() if k not in logged})
        if setup.inputs:
            client.log_inputs(self.run_id, datasets=list(setup.inputs))
        for name, document in setup.documents.items():
            log_json(document, name)
        for path, folder in setup.files:
            mlflow.log_artifact(str(path), folder)
        # Before any epoch: MLflow's compare view plots lr against the first metric a run logged.
        for key, value in setup.metrics.items():
            mlflow.log_metric(key, float(value), step=0)

    # --- fit's callback ------------------------------------------------------------------------------

    def on_epoch_end(self, stats: EpochStats) -> None:
        # An epoch repeated after a crash replaces its earlier record.
        self.history = [s for s in self.history if s.epoch < stats.epoch] + [stats]
        # Each try costs the bounded retries (seconds): not every epoch while the server is away.
        if self.active and (not self.behind or time.monotonic() - self.failed_at >= RETRY_S):
            self.catch_up()

    def on_fit_end(self, history: list[EpochStats]) -> None:
        self.history = list(history)
        if self.active and self.catch_up():
            try:
                mlflow.log_figure(curves(history), "curves.png")
                self.curves_logged = True
            except TRACKING_ERRORS as err:
                self.fell_behind(err)
            except OSError as err:  # an artifact store that refuses: the train stage says so after its outputs
                log.warning("could not log curves.png: %s", err)

    def catch_up(self) -> bool:
        """Log the epochs the run misses; False (training goes on) when the server is away."""
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

    # --- the end -------------------------------------------------------------------------------------

    def check_caught_up(self, written: str) -> None:
        """After the outputs are written: a TrackingUnavailable naming the tracking URI when the run
        still misses epochs (the server stayed away to the end)."""
        if self.behind:
            raise TrackingUnavailable(
                f"the MLflow tracking server {mlflow.get_tracking_uri()} was away to the end: run {self.run_id} "
                f"misses epochs; {written} is written. Once the server answers, rerun `dvc repro`: it logs them "
                "from the checkpoint without training again.")

    def log_results(self, final: Path, params: Params, files: tuple[Path, Path], selected: dict,
                    predictions: tuple | None = None) -> None:
        """The kept epoch's scores (``selected``: val_acc, val_loss, selected_epoch, ...), the
        validation prediction grid PNG (``predictions``: the validation set, its probabilities,
        truth and classes; None without a split), the metrics file, the run's description, and
        the model ``final`` (model.pt) as the logged model that registration registers
        (finetune/tracking/packaging.py); each once, so a rerun after a failure logs only what is
        missing; then ``run_file`` records the run complete. ``files``: the metrics file and the
        params.yaml the model ships with.

        Raises :class:`TrackingUnavailable` when the tracking server is still away (the run misses
        epochs), :class:`ArtifactStoreError` when the artifact store refuses a file."""
        with results_errors(self.run_id):
            if self.behind:  # on_fit_end has just asked
                raise MlflowException("no answer by the end of training")
            if not self.curves_logged:
                mlflow.log_figure(curves(self.history), "curves.png")
            run = MlflowClient().get_run(self.run_id)
            describe_run(run.data.tags.get("variant", ""), selected, params)
            kept = {f"selected.{k}": float(v) for k, v in selected.items()
                    if v is not None and k != "stopped_early_at" and not isinstance(v, str)}
            if kept and not kept.keys() <= run.data.metrics.keys():
                mlflow.log_metrics(kept)
            if predictions is not None:
                mlflow.log_figure(prediction_grid(*predictions), "predictions.png")
            metrics_file, params_file = files
            mlflow.log_artifact(str(metrics_file))
            if not model_logged(self.run_id):
                log_classifier(final, params_file, served_limits(params))
        if self.run_file is not None:
            self.run_file.write(self.run_id, complete=True)


@contextmanager
def results_errors(run_id: str) -> Iterator[None]:
    """A tracking server away or an artifact store refusing, while a finished training logs its
    results, as one plain error that says the outputs are written and what to rerun."""
    uri = mlflow.get_tracking_uri()
    try:
        yield
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


def resume_token(checkpoint: dict | None) -> str | None:
    """The run a checkpoint's training was recorded in (None: none, or a checkpoint without one)."""
    extra, _ = stored_for_watchers(checkpoint)
    return extra.get(TOKEN) or None


def resumable(run_id: str) -> bool:
    """Whether the store still holds run ``run_id`` to continue (deleted or lost: a new run is
    started, with a warning); a store that does not answer raises."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        log.warning("MLflow run %s is gone from the tracking store: the training is recorded in a new run", run_id)
        return False
    return True


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
    only when asked for), speed and each group's lr (finetune/train/lr_groups.py)."""
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


@contextmanager
def ended(run, parent: str | None = None) -> Iterator:
    """``run`` (an active run of a record kept by hand: the search's) as a context: ended
    FINISHED, or FAILED on an error, and its ``parent`` with it (see :class:`TrainingRecord`)."""
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


# --- the records of the stages -----------------------------------------------------------------------


def pipeline_parent(params: Params, project: Path, version: str, commit: str) -> Where:
    """The pipeline's experiment and its parent run (made by the first training or search to ask)."""
    experiment = pipeline_experiment(params.data.dir, project)
    key = pipeline_key(version, commit, params.model.model_dump(mode="json"),
                       {name: t.model_dump() for name, t in params.train.items()})
    return Where(experiment, parent_run(experiment, key, {"data_version": version, "git_commit": commit}))


@dataclass(frozen=True)
class VariantData:
    """What a variant trains on, as its run records it: the data and code versions, the images
    of each split, the validation files (``<out>/validation.csv``), and the cross-validated
    accuracy of the lr its search chose (None: it has a validation split)."""

    version: str
    commit: str
    train_images: int
    val_images: int
    validation_files: Path
    cross_validated: float | None = None


def variant_record(params: Params, settings: dict, cfg: TrainConfig, project: Path, out: Path, fingerprint: str,
                   data: VariantData, tags: dict[str, str], checkpoint: dict | None = None) -> TrainingRecord:
    """The record of the variant ``settings["variant"]``: the unfinished run of these settings
    (named by the checkpoint, or by ``<out>/run.json`` before the first one), or a new run nested
    in the pipeline's parent run. ``tags``: what it trains on (the device)."""
    variant = settings["variant"]
    run_file = RunFile(out, fingerprint)
    _, history = stored_for_watchers(checkpoint)
    return TrainingRecord(project, variant, lambda: pipeline_parent(params, project, data.version, data.commit),
                          setup=variant_setup(params, settings, cfg, project, data, tags | {"variant": variant}),
                          resume=resume_token(checkpoint) or run_file.unfinished(), history=history,
                          run_file=run_file, pipeline=True)


def variant_setup(params: Params, settings: dict, cfg: TrainConfig, project: Path, data: VariantData,
                  tags: dict[str, str]) -> Setup:
    """Params (every hyperparameter and group lr, data and code versions, the validation summary),
    the train and validation data as inputs, config.json, the validation report, params.yaml and
    the validation files."""
    values = flatten("train", settings["train"]) | flatten("model", settings["model"])
    values |= {"variant": settings["variant"], "weights": settings["weights"], "data_version": data.version,
               "git_commit": data.commit, "classes": len(settings["classes"]),
               "train_images": data.train_images, "val_images": data.val_images}
    # Named as the groups train (finetune/train/lr_groups.py): `lr` the base rate of every
    # variant, so that runs compare on one column.
    values |= lr_params(cfg)
    files: list[tuple[Path, str | None]] = []
    report = project / params.validate_.report
    if report.exists():
        summary = json.loads(report.read_text())
        values |= {f"validation.{k}": summary.get(k) for k in ("passed", "files", "used", "quarantined")}
        files.append((report, "validation"))
    files += [(project / "params.yaml", None), (data.validation_files, "validation")]
    splits = ("train", "validation") if data.val_images else ("train",)
    inputs = tuple(dataset_input(params.data.url, str(params.data.dir), data.version, s) for s in splits)
    # A training without a validation split (every train image trains) has the cross-validated
    # accuracy of the lr its search chose as val_acc at step 0, as the variants with a split do.
    metrics = {"val_acc": data.cross_validated} if data.cross_validated is not None else {}
    return Setup(values, tags, inputs, {"config.json": settings}, tuple(files), metrics)


def pretrain_record(project: Path, dataset: str, cfg: TrainConfig, classes: int, tags: dict[str, str],
                    checkpoint: dict | None = None) -> TrainingRecord:
    """The source model's record: a run in the experiment ``pretrain-<dataset>`` with its settings
    and group lrs as params (the run a checkpoint names continues after a crash)."""
    def where() -> Where:
        return Where(experiment_id(f"pretrain-{dataset}", project, (
            f"The source model (step 1 of the recipe): the network trained from scratch on the {dataset} data "
            "by the pretrain stage; model.weights: models/source/model.pt fine-tunes from it.")))

    _, history = stored_for_watchers(checkpoint)
    setup = Setup(flatten("pretrain", cfg.model_dump()) | lr_params(cfg) | {"classes": classes}, tags)
    return TrainingRecord(project, "pretrain", where, setup=setup, resume=resume_token(checkpoint), history=history)


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
