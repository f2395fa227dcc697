"""Training on tiny real images on the CPU: optimiser groups, strategies, checkpoints, resume
after kill -9, and the MLflow record read back with MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO
from images import write_dataset
from mlflow.tracking import MlflowClient

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN
from finetune.core.errors import ConfigError
from finetune.demo.workspace import stage_env, write_params
from finetune.model.factory import build_model
from finetune.stages.train import Paths, train_variant
from finetune.train.callbacks import Callback
from finetune.train.checkpoints import load_checkpoint
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.lr_groups import TABLE, configured_lrs, lr_metrics, lr_params
from finetune.train.runtime import resolve_runtime
from finetune.train.strategy import make_optimizer

TINY = {"model.weights": "none", "model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32,
        # Two steps on eight images check machinery, not judgment (tests/train/test_judgment.py)
        "search.enabled": False, "train_defaults.judge_epochs": False, "train_defaults.min_steps": 0}


def tiny_train(**changes) -> dict[str, object]:
    base = {"epochs": 2, "batch_size": 4, "max_steps": 2, "workers": 0, "precision": "fp32", "val_fraction": 0.5,
            "checkpoint_every_s": 0}  # tiny epochs: checkpoint each, as the resume tests expect
    return {f"train.finetune.{k}": v for k, v in (base | changes).items()}


def make_project(root: Path, classes=("hotdog", "not-hotdog"), train=4, test=2, **overrides) -> Path:
    """A project folder: params, a dataset of real JPEGs and its validated file list."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(REPO / "params.yaml", root / "params.yaml", TINY | tiny_train() | overrides)
    dataset = write_dataset(root / "data" / "hotdog", train=train, test=test, classes=classes)
    rows = [{"path": p.relative_to(dataset).as_posix(), "split": p.parts[-3], "class": p.parts[-2]}
            for p in sorted(dataset.rglob("*.jpg"))]
    (root / "data" / "validate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "validate" / "files.csv", index=False)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PIPELINE_RUN, raising=False)
    return make_project(tmp_path)


def paths(variant: str = "finetune") -> Paths:
    return Paths(Path(f"models/{variant}"), Path(f"metrics/{variant}.json"), Path(f"plots/{variant}.csv"))


@pytest.mark.parametrize(("mult", "groups"), [(10.0, {"body": 0.01, "head": 0.1}), (None, {"all": 0.01})])
def test_optimizer_groups_carry_the_configured_lrs(project, mult, groups):
    write_params(project / "params.yaml", project / "params.yaml",
                 {"train.finetune.lr": 0.01, "train.finetune.head_lr_mult": mult, "train.finetune.momentum": 0.9})
    cfg = load_params(project / "params.yaml").train["finetune"]
    optimizer = make_optimizer(build_model("resnet18", "none", 2), cfg)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(groups)
    assert all(g["weight_decay"] == cfg.weight_decay and g["momentum"] == 0.9 for g in optimizer.param_groups)
    # The one table of group names (what runs show them as) knows every group the optimiser builds.
    assert configured_lrs(cfg) == pytest.approx(groups) and groups.keys() <= TABLE.keys()
    assert lr_params(cfg) == pytest.approx({"lr": 0.01} | ({"lr.head": 0.1} if mult else {}))


class OnEpoch(Callback):
    """Hands each epoch's stats to ``function``; remembers the epochs of the history at the end."""

    def __init__(self, function) -> None:
        self.function, self.ended = function, None

    def on_epoch_end(self, stats) -> None:
        self.function(stats)

    def on_fit_end(self, history) -> None:
        self.ended = [s.epoch for s in history]


def fit_tiny(project: Path, **changes):
    write_params(project / "params.yaml", project / "params.yaml", tiny_train(**changes))
    params = load_params(project / "params.yaml")
    cfg = params.train["finetune"]
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files, pin=False,
                   project=project)
    model = build_model("resnet18", "none", len(data.classes))
    return model, lambda **kw: fit(model, data, cfg, resolve_runtime(cfg), project / "models" / "t",
                                   fingerprint="t", **kw)


@pytest.mark.slow
def test_freeze_trains_the_head_only_and_keeps_batchnorm_statistics(project):
    model, run = fit_tiny(project, strategy="freeze", epochs=1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed), sorted(changed)[:5]


@pytest.mark.slow
def test_gradual_unfreezes_the_planned_blocks_at_their_epochs(project):
    model, run = fit_tiny(project, strategy="gradual", epochs=3, unfreeze={2: "layer4", 3: "layer3"},
                          unfreeze_lr_mult=0.1, lr=0.01, head_lr_mult=10)
    seen = []

    def record(stats):
        trainable = {name for name in ("layer2", "layer3", "layer4", "fc")
                     if all(p.requires_grad for p in getattr(model, name).parameters())}
        seen.append((stats.epoch, sorted(trainable), stats.lrs))

    run(callbacks=[OnEpoch(record)])
    assert [s[1] for s in seen] == [["fc"], ["fc", "layer4"], ["fc", "layer3", "layer4"]]
    assert seen[2][2] == pytest.approx({"head": 0.1, "layer4": 0.001, "layer3": 0.001})
    # In a run: one metric per group, each block its own; the blocks' configured rate one param.
    assert lr_metrics(seen[2][2]) == pytest.approx({"lr_head": 0.1, "lr_layer4": 0.001, "lr_layer3": 0.001})
    cfg = load_params(project / "params.yaml").train["finetune"]
    assert lr_params(cfg) == pytest.approx({"lr": 0.01, "lr.head": 0.1, "lr.unfrozen": 0.001})


@pytest.mark.slow
def test_a_checkpoint_is_written_every_epoch_and_a_rerun_resumes(project):
    model, run = fit_tiny(project, epochs=2)
    history = run().history
    state = load_checkpoint(project / "models" / "t", "t")
    assert state["epoch"] == 2 and len(history) == 2
    assert load_checkpoint(project / "models" / "t", "other settings") is None
    model2, run2 = fit_tiny(project, epochs=3)
    epochs = []
    callback = OnEpoch(lambda s: epochs.append(s.epoch))
    resumed = run2(checkpoint=state, callbacks=[callback])
    assert epochs == [3] and [s.epoch for s in resumed.history] == [1, 2, 3] and callback.ended == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [2, 5])
def test_train_stage_writes_outputs_and_an_mlflow_run(project, num_classes, monkeypatch):
    names = tuple(f"c{i}" for i in range(num_classes))
    make_project(project / "p", classes=names)
    monkeypatch.chdir(project / "p")
    params = load_params()
    result = train_variant(params, "finetune", paths())
    model = torch.load("models/finetune/model.pt", weights_only=True)
    assert model["classes"] == list(names) and model["model"]["fc.weight"].shape[0] == num_classes
    assert model["settings"]["train"]["epochs"] == 2  # the config travels with the weights
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["epochs_trained"] == 2 and 0 <= metrics["val_acc"] <= 1 and metrics["val_acc"] == result.val_acc
    assert metrics["selected_epoch"] == model["selected_epoch"] and model["val_acc"] == result.val_acc
    plot = pd.read_csv("plots/finetune.csv")
    assert list(plot["epoch"]) == [1, 2] and "test_acc" not in plot and plot["val_acc"].between(0, 1).all()
    held = pd.read_csv("models/finetune/validation.csv")  # 2 of each class's 4 train images
    assert sorted(held["class"]) == sorted(names * 2)

    client = MlflowClient(f"sqlite:///{Path('mlflow/mlflow.db').resolve()}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune"
    assert float(run.data.params["lr.head"]) == pytest.approx(params.train["finetune"].lr * 10)
    assert run.data.params["train.strategy"] == "full" and run.data.params["classes"] == str(num_classes)
    assert run.data.tags["device"] == "cpu" and run.data.tags["precision"] == "fp32"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["finetune.pipeline"]
    assert [m.step for m in client.get_metric_history(result.run_id, "val_acc")] == [1, 2]
    assert not client.get_metric_history(result.run_id, "test_acc")  # the test split is evaluation's
    assert {m.key for m in client.get_metric_history(result.run_id, "lr_head")} == {"lr_head"}
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"curves.png", "predictions.png", "config.json", "params.yaml", "finetune.json", "validation"} <= artifacts
    assert list(Path("mlflow/artifacts").rglob("predictions.png")) and not Path("mlruns").exists()
    import mlflow.pytorch

    (logged,) = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == result.run_id]
    Path("downloaded").mkdir()
    loaded = mlflow.pytorch.load_model(f"models:/{logged.model_id}", dst_path="downloaded")
    with torch.inference_mode():
        assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_resumes_and_continues_the_mlflow_run(tmp_path):
    project = make_project(tmp_path, train=24, test=4, **{"model.train_crop": 64, "model.test_resize": 72,
                                                           "model.test_crop": 64})
    write_params(project / "params.yaml", project / "params.yaml",
                 tiny_train(epochs=3, max_steps=None, batch_size=4))
    env = stage_env() | {"MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    command = [sys.executable, "-m", "finetune", "train", "finetune", "--out", "models/finetune",
               "--metrics", "m.json", "--plots", "p.csv"]
    first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = project / "models" / "finetune" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "finished before it could be killed: " + first.stdout.read()
    os.kill(first.pid, signal.SIGKILL)  # in epoch 2: the checkpoint of epoch 1 exists
    first.wait()
    state = torch.load(checkpoint, weights_only=False)
    done = state["epoch"]
    assert 1 <= done < 3
    # The checkpoint names its run only by the tracking record's opaque token, which the record
    # reads back on the rerun.
    assert set(state["extra"]) == {"settings", "tracking"} and not any("mlflow" in key for key in state["extra"])

    second = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resuming: epoch {done} of 3 done" in second.stderr
    run_id = json.loads((project / "models" / "finetune" / "run.json").read_text())["mlflow_run_id"]
    assert state["extra"]["tracking"] == run_id
    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run_id, "val_acc")}) == [1, 2, 3]
    runs = client.search_runs([run.info.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_id for r in children] == [run_id]  # no orphan from the killed attempt
    assert json.loads((project / "m.json").read_text())["epochs_trained"] == 3


@pytest.mark.slow
def test_a_finished_training_is_not_resumed_but_trained_afresh(project, monkeypatch):
    monkeypatch.chdir(project)
    params = load_params()
    first = train_variant(params, "finetune", paths())
    second = train_variant(params, "finetune", paths())
    assert second.run_id != first.run_id and [s.epoch for s in second.history] == [1, 2]
    record = json.loads(Path("models/finetune/run.json").read_text())
    assert record == {"fingerprint": record["fingerprint"], "mlflow_run_id": second.run_id, "complete": True}
    client = MlflowClient(f"sqlite:///{Path('mlflow/mlflow.db').resolve()}")
    # Same settings, data and code: both trainings are children of one pipeline run.
    parents = {client.get_run(r).data.tags["mlflow.parentRunId"] for r in (first.run_id, second.run_id)}
    assert len(parents) == 1


def test_pretrain_refuses_a_source_model_that_starts_from_pretrained_weights(project):
    """The pretrain stage always trains the source model from random weights: params.yaml is
    refused at load (before any stage runs) unless pretrain.train.init is scratch."""
    write_params(project / "params.yaml", project / "params.yaml", {"pretrain.train.init": "pretrained"})
    with pytest.raises(ConfigError) as refused:
        load_params(project / "params.yaml")
    message = str(refused.value)
    assert "pretrain.train.init is 'pretrained'" in message and "Set `init: scratch` under pretrain.train" in message
    # The default recipe (train_defaults: init scratch) is what pretrain uses.
    write_params(project / "params.yaml", project / "params.yaml", {"pretrain.train.init": "scratch"})
    assert load_params(project / "params.yaml").pretrain.train.init == "scratch"
