"""Tracking outages cost no epochs: a real `mlflow server` killed mid-training and restarted on
the same port and store; an artifact store that refuses the final model; each metric step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import free_port, start_server
from mlflow.tracking import MlflowClient
from train.test_training import make_project, paths, tiny_train

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN
from finetune.stages.train import train_variant
from finetune.tracking import runs
from finetune.tracking.store import HTTP_LIMITS, use_store
from finetune.train.callbacks import EpochStats

EPOCHS = 5
# Epochs long enough (about a second each on 2 CPU cores) for the server to die between them.
SLOW_EPOCHS = tiny_train(epochs=EPOCHS, batch_size=8, max_steps=None) | {
    "model.train_crop": 64, "model.test_resize": 64, "model.test_crop": 64}


class Server:
    """A real `mlflow server` on a fixed port, SQLite backend and artifact root under ``root``:
    kill -9 it and start it again with the same store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.process = start_server(command, f"{self.uri}/health", self.root / "server.log")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the whole group: the server and its workers
            self.process.wait(timeout=20)
            self.process = None


@pytest.fixture
def server(tmp_path) -> Server:
    root = tmp_path / "server"
    root.mkdir()
    result = Server(root)
    result.start()
    yield result
    result.stop()


def train_command(project: Path, uri: str) -> subprocess.Popen:
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for name in HTTP_LIMITS:
        env.pop(name, None)  # the project's own limits
    return subprocess.Popen([sys.executable, "-m", "finetune.stages.train", "finetune", "--out", "models/finetune",
                             "--metrics", "metrics/finetune.json", "--plots", "plots/finetune.csv"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epochs_done(out: Path) -> int:
    path = out / "checkpoint.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.exists() else 0
    except (EOFError, RuntimeError):  # read while being replaced
        return 0


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_training_outlives_a_tracking_server_outage_and_the_rerun_logs_the_rest(tmp_path, server):
    project = make_project(tmp_path / "project", **SLOW_EPOCHS)
    out = project / "models" / "finetune"
    training = train_command(project, server.uri)
    while epochs_done(out) < 1 and training.poll() is None:
        time.sleep(0.05)
    server.stop()  # kill -9 mid-training: the server is gone before epoch 2 is logged
    stopped = time.monotonic()
    stdout, stderr = training.communicate(timeout=120)
    seconds = time.monotonic() - stopped
    assert training.returncode == 1, stdout + stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: the MLflow tracking server " + server.uri), stderr
    assert "dvc repro" in error
    assert stderr.count("does not answer") == 1, stderr  # one warning, not one per epoch
    assert seconds < 45, seconds  # seconds per request, not MLflow's minutes
    # Every epoch trained and checkpointed, the model written, the run left to continue.
    assert epochs_done(out) == EPOCHS and (out / "model.pt").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] is False

    server.start()  # the same port and store
    rerun = train_command(project, server.uri)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout + stderr
    assert f"resuming: epoch {EPOCHS} of {EPOCHS} done" in stderr  # no epoch trained again
    assert not (out / "checkpoint.pt").exists()  # the run is complete: its checkpoint is not kept
    after = json.loads((out / "run.json").read_text())
    assert after == record | {"complete": True}  # the same MLflow run
    client = MlflowClient(server.uri)
    for key in ("train_loss", "val_acc", "epoch_seconds"):
        assert steps(client, record["mlflow_run_id"], key) == list(range(1, EPOCHS + 1)), key
    assert len(client.get_metric_history(record["mlflow_run_id"], "selected.val_acc")) == 1
    assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(record["mlflow_run_id"])}
    assert {"curves.png", "predictions.png"} <= names


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PIPELINE_RUN, raising=False)
    return make_project(tmp_path / "project", **tiny_train(epochs=2))


@pytest.mark.slow
def test_an_unwritable_artifact_store_is_a_message_and_the_rerun_logs_results_once(project):
    # The local store keeps logged models under <experiment>/models/: a file there refuses the
    # final model only, after the epochs, the curves and the predictions went in.
    experiment = project / "mlflow" / "artifacts" / "finetune-hotdog"
    experiment.mkdir(parents=True)
    (experiment / "models").write_text("in the way")
    params = load_params(project / "params.yaml")
    with pytest.raises(runs.ArtifactStoreError) as failed:
        train_variant(params, "finetune", paths(), project)
    message = str(failed.value)
    assert "\n" not in message and str(experiment / "models") in message and "dvc repro" in message
    out = project / "models" / "finetune"
    assert (out / "model.pt").exists()
    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]

    (experiment / "models").unlink()
    result = train_variant(params, "finetune", paths(), project)
    assert result.run_id == run_id
    client = MlflowClient()
    assert len(client.get_metric_history(run_id, "selected.val_acc")) == 1
    assert steps(client, run_id, "train_loss") == [1, 2]
    experiment = client.get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    assert [str(m.status).endswith("READY") for m in models].count(True) == 1, models


def test_epochs_are_logged_once_however_often_they_are_offered(project):
    use_store(project)
    history = [EpochStats(epoch, 1.0 / epoch, 0.5, 10.0, 1.0, {"all": 0.01}, val_acc=0.5) for epoch in (1, 2, 3)]
    with mlflow.start_run() as run:
        assert runs.log_missing_epochs(run.info.run_id, history[:2]) == 2
        # a crash between an epoch's log and its checkpoint: the resume offers epoch 2 again
        assert runs.log_missing_epochs(run.info.run_id, history) == 1
        assert runs.log_missing_epochs(run.info.run_id, history) == 0
    client = MlflowClient()
    for key in ("train_loss", "lr", "images_per_s"):  # one group ("all") is logged as `lr`
        assert steps(client, run.info.run_id, key) == [1, 2, 3]


def test_a_run_continued_before_its_first_epoch_keeps_its_params_when_the_commit_moved(project):
    """A stop before the first epoch leaves a run with its params and no checkpoint: the rerun
    continues that run (run.json names it) and logs its setup again, at a new git commit (`make
    demo` refreshes its workspace) that MLflow would refuse as a changed param."""
    params = load_params(project / "params.yaml")
    cfg = params.train["finetune"]
    settings = {"variant": "finetune", "train": cfg.model_dump(), "model": params.model.model_dump(mode="json"),
                "classes": ["hotdog", "not-hotdog"], "weights": "none"}
    out = project / "models" / "finetune"
    out.mkdir(parents=True)
    (out / "validation.csv").write_text("path,class\n")

    def record(commit: str) -> runs.TrainingRecord:
        seen = runs.VariantData("v1.dir", commit, 8, 4, out / "validation.csv")
        return runs.variant_record(params, settings, cfg, project, out, "f", seen, {"device": "cpu"})

    with record("commit-a") as first:
        pass  # a stop before the first epoch: run.json names the run, unfinished
    assert runs.read_run_file(out, "f") == first.token
    with record("commit-b") as second:  # no MlflowException
        assert second.token == first.token
    logged = MlflowClient().get_run(first.token).data.params
    assert logged["git_commit"] == "commit-a" and logged["variant"] == "finetune"
