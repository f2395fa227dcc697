"""The study in MLflow: one parent run "study-<key>" in the experiment ``finetune-<data>-study``,
a nested run per training (variant, fraction, seed), kept by a training record as it trains
(finetune/tracking/runs.py), and the summary (per-fraction means, the verdict as its
description, the learning curve and the report) on the parent. A tracking store that is away
costs a warning: the study's files are its record."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from finetune.tracking.runs import TRACKING_ERRORS, Setup, TrainingRecord, Where
from finetune.tracking.store import NOTE_TAG, experiment_id, pipeline_experiment_name, use_store
from finetune.train.callbacks import Callback

log = logging.getLogger(__name__)
STUDY_TAG = "finetune.study"


def study_parent(project: Path, dataset: Path, key: str) -> str | None:
    """The parent run of study ``key`` (created by the first seed to ask); None when the store
    does not answer."""
    try:
        use_store(project)
        name = f"{pipeline_experiment_name(dataset)}-study"
        experiment = experiment_id(name, project, (
            "When does fine-tuning beat training from scratch? Each parent run is one study: both variants "
            "retrained over seeds and nested fractions of the train split, one nested run per training, "
            "the learning curve and the verdict on the parent."))
        client = MlflowClient()
        found = client.search_runs([experiment], filter_string=f"tags.`{STUDY_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        return client.create_run(experiment, run_name=f"study-{key[:8]}", tags={STUDY_TAG: key}).info.run_id
    except TRACKING_ERRORS as err:
        log.warning("MLflow does not answer (%s): the study is not tracked there", str(err).splitlines()[0][:200])
        return None


class StudyRecord(TrainingRecord):
    """One training of the study as a run nested under the study's parent run, kept as it trains
    (per-epoch curves, the lrs) and ended with its test accuracy. The study's files are its
    record: a tracking store that is away costs a warning, never the training."""

    def __enter__(self) -> StudyRecord:
        try:
            super().__enter__()
        except TRACKING_ERRORS as err:
            log.warning("could not log the study run to MLflow (%s)", str(err).splitlines()[0][:200])
        return self

    def on_result(self, result: dict) -> None:
        """The test accuracy, the kept epoch and its validation accuracy (step 0), and the run's
        description in words."""
        if not self.active:
            return
        note = (f"{self.name}: test accuracy {result['test_acc']:.3f} on {result['train_images']} train images "
                f"(epoch {result['selected_epoch']} kept by validation)")
        metrics = [Metric(k, float(result[k]), int(time.time() * 1000), 0)
                   for k in ("test_acc", "val_acc", "selected_epoch") if result.get(k) is not None]
        try:
            MlflowClient().log_batch(self.run_id, metrics=metrics, tags=[RunTag(NOTE_TAG, note)])
        except TRACKING_ERRORS as err:
            log.warning("could not log the study run's result to MLflow (%s)", str(err).splitlines()[0][:200])


def study_record(project: Path, parent: str | None, run: dict) -> AbstractContextManager[Callback]:
    """The record of one study training (``run``: variant, fraction, seed, train_images) under
    ``parent``; a callback that records nothing when the study has no parent run (the store did
    not answer when the seed began)."""
    if parent is None:
        return nullcontext(Callback())
    name = f"{run['variant']} {run['fraction']:g} seed {run['seed']}"
    setup = Setup(params={k: run[k] for k in ("variant", "fraction", "seed", "train_images")},
                  tags={"variant": run["variant"]})
    return StudyRecord(project, name, lambda: Where(MlflowClient().get_run(parent).info.experiment_id, parent),
                       setup=setup, system_metrics=False)


def log_study_summary(project: Path, parent: str | None, document: dict, files: list[Path]) -> None:
    """Per fraction each variant's mean test accuracy and the mean difference, the verdict as
    the parent's description, ``files`` (learning curve, report) as its artifacts; then it ends."""
    if parent is None:
        return
    try:
        use_store(project)
        client = MlflowClient()
        now = int(time.time() * 1000)
        metrics = []
        for row in document["fractions"].values():
            for name in (document["challenger"], document["baseline"], "difference"):
                metrics.append(Metric(f"{name}.test_acc" if name != "difference" else "difference.test_acc",
                                      float(row[name]["mean"]), now, row["train_images"]))
        client.log_batch(parent, metrics=metrics)
        client.set_tag(parent, NOTE_TAG, document["verdict"])
        for path in files:
            client.log_artifact(parent, str(path), "study")
        client.set_terminated(parent)
    except TRACKING_ERRORS as err:
        log.warning("could not log the study summary to MLflow (%s)", str(err).splitlines()[0][:200])
