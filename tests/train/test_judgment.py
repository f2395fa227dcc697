"""Judgment on real trainings of tiny, learnable data: divergence and collapse caught and never
kept, the recipe fitted to small data, the learning-rate search (validation or k-fold) in its
output file, MLflow and the training that follows."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO
from images import encode
from mlflow.tracking import MlflowClient
from PIL import Image

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN
from finetune.demo.workspace import write_params
from finetune.model.factory import build_model
from finetune.stages.search import search_variant
from finetune.stages.train import Paths, train_variant
from finetune.train.health import COLLAPSED, DIVERGED, TrainingFailed
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.recipe import fit_recipe
from finetune.train.runtime import resolve_runtime
from finetune.train.search import CROSS_VALIDATION, VALIDATION, lr_grid, plan_search, run_search, train_labels, tuned

# Learnable in a few steps at 32 px: warm, striped "hotdog" images against cool, spotted others.
SMALL = {"model.weights": "none", "model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32,
         "train_defaults.workers": 0, "train_defaults.precision": "fp32", "train_defaults.checkpoint_every_s": 0,
         "train_defaults.epochs": 3, "train_defaults.batch_size": 8, "train_defaults.momentum": 0.9,
         "train_defaults.min_steps": 0, "train_defaults.val_fraction": 0.25, "train.finetune.lr": 0.003, "train.finetune.head_lr_mult": None, "train.scratch.lr": 0.003,
         "train.finetune.init": "scratch", "search.budget": 2, "search.min_val_per_class": 3}


def picture(label: int, rng: random.Random) -> bytes:
    """A 40 px image of class ``label``: red-yellow horizontal stripes, or blue-green dots."""
    image = Image.new("RGB", (40, 40))
    pixels = []
    for y in range(40):
        for x in range(40):
            noise = rng.randint(-30, 30)
            if label == 0:
                pixels.append((220 + noise // 2, 120 + 80 * ((y // 4) % 2) + noise, 30))
            else:
                pixels.append((30, 120 + noise, 200 + 50 * ((x // 5 + y // 5) % 2) // 2 + noise // 2))
    image.putdata(pixels)
    return encode(image, "JPEG", quality=92)


def learnable_project(root: Path, train: int = 12, test: int = 6, **overrides) -> Path:
    """A project whose dataset a small network can learn: params, JPEGs and the file list."""
    rng = random.Random(0)
    rows = []
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(("hotdog", "not-hotdog")):
            folder = root / "data" / "hotdog" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:04d}.jpg").write_bytes(picture(label, rng))
                rows.append({"path": f"{split}/{name}/{i:04d}.jpg", "split": split, "class": name})
    (root / "data" / "validate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "validate" / "files.csv", index=False)
    write_params(REPO / "params.yaml", root / "params.yaml", SMALL | overrides)
    return root


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PIPELINE_RUN, raising=False)
    return learnable_project(tmp_path / "p")


def test_the_step_budget_warning_names_the_fix_and_auto_adapts(project, caplog):
    cfg = load_params(project / "params.yaml").train["scratch"].model_copy(
        update={"batch_size": 128, "epochs": 5, "min_steps": 50})
    with caplog.at_level(logging.WARNING):
        same = fit_recipe(cfg, 72, "train.scratch")
    assert same is cfg  # nothing to resolve: the recipe as written, with a warning before it starts
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "72 train images at batch_size 128 make 1 step(s) per epoch, 5 in all" in warning
    assert "train.scratch.batch_size: auto" in warning and "train.scratch.epochs: auto" in warning
    caplog.clear()
    auto = cfg.model_copy(update={"batch_size": "auto", "epochs": "auto", "auto_steps": 300})
    with caplog.at_level(logging.WARNING):
        small = fit_recipe(auto, 72, "train.scratch")
    assert (small.batch_size, small.epochs) == (9, 38) and not caplog.records  # 8 steps an epoch, 304 in all
    big = fit_recipe(auto, 2000, "train.scratch")
    assert (big.batch_size, big.epochs) == (128, 19)  # never above the book's batch: 16 steps x 19 epochs
    assert fit_recipe(auto, 10, "k").batch_size == 2  # BatchNorm needs two images


def test_loaders_train_with_the_batch_that_auto_resolves(project):
    write_params(project / "params.yaml", project / "params.yaml", {"train.scratch.batch_size": "auto"})
    params = load_params(project / "params.yaml")
    data = loaders(params, params.train["scratch"], project / "data" / "hotdog", project / "data/validate/files.csv",
                   pin=False, project=project, key="train.scratch.val_fraction")
    # 12 train images per class, 3 of each held out: 18 train images, batch 18 // 8
    assert data.train.batch_size == data.cfg.batch_size == max(2, data.train_images // 8)


@pytest.mark.slow
def test_a_divergent_lr_is_caught_marked_and_never_chosen(project, caplog):
    # The grid is lr / lr_step and lr: 0.0033 learns, 100 blows up in its first steps.
    write_params(project / "params.yaml", project / "params.yaml",
                 {"train.scratch.lr": 100.0, "search.lr_step": 30_000.0})
    params = load_params(project / "params.yaml")
    plan = plan_search(params, "scratch", train_labels(params, project)[0])
    assert plan.method == VALIDATION and plan.lrs == pytest.approx([100 / 30_000, 100.0])
    with caplog.at_level(logging.WARNING):
        trials, chosen = run_search(params, "scratch", project, plan)
    divergent = trials[1]
    assert divergent.failure == DIVERGED and divergent.epoch is None
    assert {c["failure"] for c in divergent.curve} == {DIVERGED}  # every epoch marked, none kept
    assert chosen.lr == pytest.approx(100 / 30_000) and chosen.failure is None
    assert any("epoch 1 diverged" in r.getMessage() and "lr all 100" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_training_whose_every_epoch_collapsed_fails_naming_the_keys(project):
    params = load_params(project / "params.yaml")
    cfg = params.train["scratch"].model_copy(update={"lr": 1e-12})
    data = loaders(params, cfg, project / "data" / "hotdog", project / "data/validate/files.csv", pin=False,
                   project=project, key="train.scratch.val_fraction")
    model = build_model("resnet18", "none", 2)
    with torch.no_grad():  # a head that says "hotdog" whatever it sees; lr 1e-12 cannot undo it
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([2.0, -2.0]))  # a loss of about 2, far from diverge_loss
    with pytest.raises(TrainingFailed) as failed:
        fit(model, data, data.cfg, resolve_runtime(cfg), project / "models" / "s", fingerprint="s",
            key="train.scratch")
    assert [s.failure for s in failed.value.history] == [COLLAPSED] * 3
    message = str(failed.value)
    assert "train.scratch.lr" in message and "search.enabled" in message and "\n" not in message


@pytest.mark.slow
def test_cross_validation_scores_every_train_image_once_and_train_retrains_on_all(project):
    # workers: 2 trains the 4 trainings in two processes of their own (on 2 cores: slower, but the same)
    write_params(project / "params.yaml", project / "params.yaml",
                 {"search.min_val_per_class": 20, "search.folds": 2, "search.budget": 4, "search.workers": 2})
    params = load_params(project / "params.yaml")
    plan = plan_search(params, "scratch", train_labels(params, project)[0])
    assert plan.method == CROSS_VALIDATION and plan.folds == 2 and len(plan.lrs) == 2
    document = json.loads((search_and_train(project, params))[0].read_text())
    assert [t["val_images"] for t in document["trials"]] == [24, 24]  # each train image validated once per lr
    chosen = next(t for t in document["trials"] if t["lr"] == document["lr"])
    assert document["val_acc_sd"] is not None and len(chosen["fold_acc"]) == 2
    assert document["val_acc"] == pytest.approx(sum(chosen["fold_acc"]) / 2)
    cfg = tuned(params.train["scratch"], document)
    assert (cfg.val_fraction, cfg.select, cfg.epochs) == (0.0, "last", document["epochs"])
    model = torch.load(project / "models/scratch/model.pt", weights_only=True)
    assert model["val_source"] == CROSS_VALIDATION and model["val_acc"] == document["val_acc"]
    assert model["val_folds"] == 2 and model["settings"]["train"]["lr"] == document["lr"]
    assert not (project / "models/scratch/validation.csv").read_text().strip().split("\n")[1:]  # none held out


def search_and_train(project: Path, params) -> tuple[Path, object]:
    """The search stage's function, then the train stage's with its output (in ``project``)."""
    out = Path("metrics/search/scratch.json")
    search_variant(params, "scratch", out, project)
    paths = Paths(Path("models/scratch"), Path("metrics/train/scratch.json"), Path("plots/train/scratch.csv"), out)
    return project / out, train_variant(params, "scratch", paths, project)


@pytest.mark.slow
def test_the_search_records_every_trial_in_mlflow_and_train_uses_its_choice(project):
    write_params(project / "params.yaml", project / "params.yaml", {"search.budget": 3})
    params = load_params(project / "params.yaml")
    file, result = search_and_train(project, params)
    document = json.loads(file.read_text())
    assert document["method"] == VALIDATION and len(document["trials"]) == 3
    assert [t["lr"] for t in document["trials"]] == pytest.approx(lr_grid(0.003, 3, params.search.lr_step))
    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    search = client.get_run(document["mlflow_run_id"])
    assert search.info.run_name == "search@scratch" and search.info.status == "FINISHED"
    assert float(search.data.metrics["chosen_lr"]) == pytest.approx(document["lr"])
    trials = client.search_runs([search.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{search.info.run_id}'")
    assert sorted(float(t.data.params["lr"]) for t in trials) == pytest.approx(sorted(t["lr"] for t in document["trials"]))
    for trial in trials:
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_acc")] == [1, 2, 3] or \
            trial.data.tags["failure"] != "none"
    training = client.get_run(result.run_id)
    # The search and the training it chose for are children of the same pipeline run.
    assert training.data.tags["mlflow.parentRunId"] == search.data.tags["mlflow.parentRunId"]
    assert float(training.data.params["lr"]) == pytest.approx(document["lr"])
    model = torch.load(project / "models/scratch/model.pt", weights_only=True)
    assert model["val_source"] == VALIDATION and model["lr"] == pytest.approx(document["lr"])


def test_the_train_stage_depends_on_its_search_in_dvc_yaml():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "${search.out}/${key}.json" in stages["train"]["do"]["deps"]
    assert "--search ${search.out}/${key}.json" in stages["train"]["do"]["cmd"]
    # persist: a failed rerun of the search keeps the last choice (DVC would delete it first)
    assert stages["search"]["do"]["outs"] == [{"${search.out}/${key}.json": {"cache": False, "persist": True}}]
    # the study reads the compared variants' searches through study_plan's file
    assert {"${search.out}/${evaluate.challenger}.json", "${search.out}/${evaluate.baseline}.json"} <= set(
        stages["study_plan"]["deps"])
