"""Trained-model stand-ins whose predictions the tests know, saved as the train stage saves its
final model: a real ResNet-18 whose output layer always favours one class (a model at chance),
and a real ResNet-18 wired to answer by colour (red: hotdog) on test images coloured by class,
whose accuracy is set exactly by its threshold (a model that learned)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from conftest import REPO
from images import encode, write_dataset
from PIL import Image
import mlflow
from mlflow.tracking import MlflowClient

from finetune.core.config import load_params
from finetune.demo.workspace import write_params
from finetune.model.classifier import save_final
from finetune.model.factory import build_model
from finetune.tracking.packaging import log_classifier, served_limits
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


# The coloured images' colours as (red, blue); green varies a little so that files differ. Every
# other image is plainly blue (redness, normalised red − normalised blue, -3.8); hot dogs are
# plainly red (3.1), except the last two test hot dogs (of three or more): one medium (1.4) and
# one faint red (0.0).
BLUE, RED, MEDIUM, FAINT = (30, 230), (230, 30), (200, 100), (160, 140)


@dataclass(frozen=True)
class Colour:
    """The colour() network with this threshold, as save_variant's ``favour``."""

    threshold: float


# PERFECT gets every coloured image right; MISSES_FAINT calls the faint hot dog "other", and
# MISSES_TWO the faint and the medium one: on 10 + 10 coloured test images 1.0, 0.95 and 0.9.
PERFECT, MISSES_FAINT, MISSES_TWO = Colour(-2.0), Colour(0.7), Colour(2.2)


def colour(threshold: float, sharpness: float = 5.0) -> torch.nn.Module:
    """A ResNet-18 that says hotdog when an image's redness (mean normalised red minus blue) is
    above ``threshold``: conv1 copies red − blue into two channels (its positive and negative
    parts, so ReLU keeps both), every residual branch is switched off, the downsampling paths
    pass the channels on, and the output layer compares their difference with the threshold."""
    model = build_model("resnet18", "none", len(CLASSES))
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
                value.fill_(1.0)  # BatchNorm: identity (mean 0, var 1, weight 1, bias 0)
            elif value.is_floating_point():
                value.zero_()  # every conv and the residual branches' second BatchNorm below
        for key in state:
            if key.endswith("bn2.weight"):
                state[key].zero_()  # the residual branch adds nothing: the block passes its input on
            if key.endswith("downsample.0.weight"):
                for i in range(state[key].shape[1]):
                    state[key][i, i, 0, 0] = 1.0
        state["conv1.weight"][0, 0, 3, 3], state["conv1.weight"][0, 2, 3, 3] = 1.0, -1.0  # relu(red − blue)
        state["conv1.weight"][1, 0, 3, 3], state["conv1.weight"][1, 2, 3, 3] = -1.0, 1.0  # relu(blue − red)
        state["fc.weight"][0, 0], state["fc.weight"][0, 1] = sharpness, -sharpness
        state["fc.bias"][0] = -sharpness * threshold
    model.load_state_dict(state)
    return model


def coloured_jpeg(rgb_pair: tuple[int, int], shade: int) -> bytes:
    """A one-colour JPEG: ``rgb_pair`` is (red, blue); green varies with ``shade`` so files differ."""
    red, blue = rgb_pair
    return encode(Image.new("RGB", (48, 40), (red, 40 + 7 * shade, blue)), "JPEG", quality=95)


def write_coloured(root: Path, train: int, test: dict[str, int]) -> None:
    """Overwrite the dataset's images with colours by class (see BLUE, RED, MEDIUM, FAINT)."""
    for split, counts in (("train", dict.fromkeys(CLASSES, train)), ("test", test)):
        for name, count in counts.items():
            for i in range(count):
                shade = RED if name == "hotdog" else BLUE
                if split == "test" and name == "hotdog" and count >= 3:
                    shade = {count - 1: FAINT, count - 2: MEDIUM}.get(i, RED)
                (root / split / name / f"{i:04d}.jpg").write_bytes(coloured_jpeg(shade, i))


def project_with_data(root: Path, test: dict[str, int], coloured: bool = False, **overrides) -> Path:
    """params.yaml, a dataset with ``test[class]`` test images per class, its validated file list;
    ``coloured``: the images are coloured by class (what colour() reads)."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(REPO / "params.yaml", root / "params.yaml", SETTINGS | overrides)
    data = write_dataset(root / "data" / "hotdog", train=2, test=max(test.values()), classes=tuple(CLASSES))
    if coloured:
        write_coloured(data, 2, test)
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


def save_variant(project: Path, variant: str, favour: int | Colour | None, tag: str, network: bool = False,
                 **validation) -> Path:
    """models/<variant>/model.pt with its own run and fingerprint ``tag``: a biased network
    (``favour`` a class or None), or the colour() network (``favour`` a Colour). ``network``: the
    run also holds its logged classifier, as the train stage logs it. ``validation``
    overrides the model.pt info register chooses by (val_acc, val_loss, val_source, ...)."""
    settings = {"variant": variant, "train": {}, "model": MODEL, "classes": CLASSES, "weights": "none"}
    path = project / "models" / variant / "model.pt"
    # Validation scores as on a split with the tests' 3:1 class balance (what register chooses by);
    # the colour networks alike, so that validation alone never decides between two of them.
    val_acc = 0.9 if isinstance(favour, Colour) else {0: 0.75, 1: 0.25, None: 0.5}[favour]
    info = {"val_acc": val_acc, "val_loss": 1 - val_acc} | validation
    model = colour(favour.threshold) if isinstance(favour, Colour) else biased(favour)
    run_id = training_run(project, variant)
    save_final(path, model, CLASSES, "resnet18", settings, fingerprint=tag, mlflow_run_id=run_id,
               selected_epoch=1, **info)
    if network:
        with mlflow.start_run(run_id=run_id):
            log_classifier(path, project / "params.yaml", served_limits(params(project)))
    return path


def params(project: Path):
    return load_params(project / "params.yaml")

