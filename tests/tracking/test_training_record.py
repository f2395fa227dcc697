"""One training record per training (finetune/tracking/runs.py): the checkpoint keeps only its
opaque token, the record reads it back to continue the same run after a crash, a run the store
lost is replaced, and a study training without a parent run records nothing. Real parts: tiny
trainings on real JPEGs, a SQLite MLflow store under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train.test_training import fit_tiny, make_project

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN
from finetune.tracking import runs
from finetune.tracking.study import study_record
from finetune.train.callbacks import Callback
from finetune.train.checkpoints import load_checkpoint

# Each test sets up a real workspace or trainings (tens of seconds): not in the quick pass.
pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PIPELINE_RUN, raising=False)
    return make_project(tmp_path / "p")


def source_record(project: Path, checkpoint: dict | None = None) -> runs.TrainingRecord:
    cfg = load_params(project / "params.yaml").pretrain.train
    return runs.pretrain_record(project, "hotdog", cfg, 2, {"device": "cpu"}, checkpoint)


def train_recorded(project: Path, epochs: int, checkpoint: dict | None = None) -> runs.TrainingRecord:
    """A tiny training to ``epochs`` (from ``checkpoint``) kept by the source model's record."""
    _, run = fit_tiny(project, epochs=epochs)
    with source_record(project, checkpoint) as record:
        run(checkpoint=checkpoint, extra=record.checkpoint_extra(), callbacks=[record])
    return record


def steps(run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_the_checkpoint_keeps_an_opaque_token_that_the_record_reads_back_to_continue_its_run(project):
    first = train_recorded(project, epochs=1)
    checkpoint = load_checkpoint(project / "models" / "t", "t")
    assert checkpoint["extra"] == {runs.TOKEN: first.token}  # nothing in the checkpoint names MLflow
    assert runs.resume_token(checkpoint) == first.token and runs.resume_token(None) is None

    again = train_recorded(project, epochs=2, checkpoint=checkpoint)  # the rerun after a crash
    assert again.token == first.token and steps(first.token) == [1, 2]
    run = MlflowClient().get_run(first.token)
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    # Its setup once, from the first start: the source model's settings and every group's lr.
    assert run.data.params["pretrain.strategy"] == "full" and run.data.params["lr"] == run.data.params["pretrain.lr"]
    assert run.data.tags["device"] == "cpu" and "lr" in run.data.metrics
    assert len(MlflowClient().search_runs([run.info.experiment_id])) == 1  # no orphan


def test_a_run_the_store_lost_is_replaced_and_gets_every_epoch(project):
    first = train_recorded(project, epochs=1)
    checkpoint = load_checkpoint(project / "models" / "t", "t")
    MlflowClient().delete_run(first.token)
    again = train_recorded(project, epochs=2, checkpoint=checkpoint)
    assert again.token != first.token
    assert steps(again.token) == [1, 2] and MlflowClient().get_run(again.token).data.params["classes"] == "2"


def test_a_study_training_without_a_parent_run_records_nothing(project):
    run = {"variant": "finetune", "fraction": 0.5, "seed": 0, "train_images": 4}
    with study_record(project, None, run) as tracker:
        assert type(tracker) is Callback  # the loop's do-nothing callback
    assert not (project / "mlflow").exists()
