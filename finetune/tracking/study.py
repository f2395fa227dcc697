"""The study in MLflow: one parent run "study-<key>" in the experiment ``finetune-<data>-study``,
a nested run per training (variant, fraction, seed) with its per-epoch curves, and the summary
(per-fraction means, the verdict as its description, the learning curve and the report) on the
parent. A tracking store that is away costs a warning: the study's files are its record."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from finetune.tracking.runs import TRACKING_ERRORS
from finetune.tracking.store import NOTE_TAG, experiment_id, pipeline_experiment_name, use_store
from finetune.train.callbacks import EpochStats

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


def log_study_run(parent: str | None, record: dict, history: list[EpochStats]) -> None:
    """One training of the study as a finished run nested under ``parent``."""
    if parent is None:
        return
    client = MlflowClient()
    try:
        experiment = client.get_run(parent).info.experiment_id
        name = f"{record['variant']} {record['fraction']:g} seed {record['seed']}"
        run = client.create_run(experiment, run_name=name, tags={
            "mlflow.parentRunId": parent, "variant": record["variant"], NOTE_TAG: (
                f"{name}: test accuracy {record['test_acc']:.3f} on {record['train_images']} train images "
                f"(epoch {record['selected_epoch']} kept by validation)")})
        now = int(time.time() * 1000)
        params = [Param(k, str(record[k])) for k in ("variant", "fraction", "seed", "train_images")]
        metrics = [Metric(k, float(record[k]), now, 0) for k in ("test_acc", "val_acc", "selected_epoch")
                   if record.get(k) is not None]
        for s in history:
            metrics += [Metric(k, float(v), now, s.epoch) for k, v in (("train_loss", s.train_loss),
                                                                       ("val_acc", s.val_acc)) if v is not None]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id)
    except TRACKING_ERRORS as err:
        log.warning("could not log the study run to MLflow (%s)", str(err).splitlines()[0][:200])


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
