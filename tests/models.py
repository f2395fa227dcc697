"""Trained-model stand-ins whose predictions the tests know: a real ResNet-18 whose output
layer always favours one class, saved as the train stage saves its final model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from conftest import REPO
from images import write_dataset
from mlflow.tracking import MlflowClient

from finetune.config import load_params
from finetune.demo.workspace import write_params
from finetune.model.classifier import save_final
from finetune.model.factory import build_model
from finetune.tracking.store import parent_run, pipeline_experiment, use_store

CLASSES = ["hotdog", "not-hotdog"]
MODEL = {"arch": "resnet18", "weights": "none", "train_crop": 16, "test_resize": 16, "test_crop": 16,
         "resize_mode": "squash"}
SETTINGS = {f"model.{k}": v for k, v in MODEL.items()} | {"evaluate.workers": 0}


def biased(favour: int | None, strength: float = 5.0) -> torch.nn.Module:
    """A network that predicts class ``favour`` for every image (confidence from ``strength``);
    ``favour=None``: the random network, whose answer depends on the image."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none", len(CLASSES))
    if favour is None:
        return model
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(0)
        model.fc.bias[favour] = strength
    return model


def project_with_data(root: Path, test: dict[str, int], **overrides) -> Path:
    """params.yaml, a dataset with ``test[class]`` test images per class, its validated file list."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(REPO / "params.yaml", root / "params.yaml", SETTINGS | overrides)
    data = write_dataset(root / "data" / "hotdog", train=2, test=max(test.values()), classes=tuple(CLASSES))
    rows = []
    for path in sorted(data.rglob("*.jpg")):
        split, name = path.parts[-3], path.parts[-2]
        if split == "train" or int(path.stem) < test[name]:
            rows.append({"path": path.relative_to(data).as_posix(), "split": split, "class": name})
    (root / "data" / "validate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "validate" / "files.csv", index=False)
    return root


def training_run(project: Path, variant: str) -> str:
    """A finished MLflow run for ``variant`` under a pipeline parent run, as the train stage makes."""
    use_store(project)
    experiment = pipeline_experiment(params(project).data.dir, project)
    parent = parent_run(experiment, "test-pipeline", {})
    run = MlflowClient().create_run(experiment, run_name=variant, tags={"variant": variant,
                                                                        "mlflow.parentRunId": parent})
    MlflowClient().set_terminated(run.info.run_id)
    return run.info.run_id


def save_variant(project: Path, variant: str, favour: int | None, tag: str) -> Path:
    """models/<variant>/model.pt: a biased network with its own run and fingerprint ``tag``."""
    settings = {"variant": variant, "train": {}, "model": MODEL, "classes": CLASSES, "weights": "none"}
    path = project / "models" / variant / "model.pt"
    # Validation scores as on a split with the tests' 3:1 class balance (what register chooses by).
    val_acc = {0: 0.75, 1: 0.25, None: 0.5}[favour]
    save_final(path, biased(favour), CLASSES, "resnet18", settings, fingerprint=tag,
               mlflow_run_id=training_run(project, variant), val_acc=val_acc, val_loss=1 - val_acc, selected_epoch=1)
    return path


def params(project: Path):
    return load_params(project / "params.yaml")

