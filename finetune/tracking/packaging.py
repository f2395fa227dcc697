"""The registered model's package: how a trained ``model.pt`` becomes the MLflow model
``classifier`` that any MLflow client loads.

One logged model per training run, its network stored once and readable two ways:
- ``mlflow.pyfunc.load_model``: images (base64) in, classes and probabilities out
  (finetune/tracking/portable_model.py, "models from code", with finetune/data/portable.py);
- ``mlflow.pytorch.load_model``: the same file as a torch module, tensors in and logits out.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
import torchvision
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from finetune.data import portable as data_portable
from finetune.model.classifier import load_classifier
from finetune.tracking import portable_model
from finetune.tracking.portable_model import IMAGE_COLUMN

MODEL_NAME = "classifier"  # the logged model's name in its run
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]))
# Where the pyfunc keeps the artifact "network" inside the model: MLflow's pytorch flavour reads
# <model_data>/model.pth with the pickle module named in <model_data>/pickle_module_info.txt.
NETWORK_DATA = "artifacts/network"


def encode(data: bytes) -> str:
    """The base64 text a client puts in the ``image`` column."""
    return base64.b64encode(data).decode("ascii")


def example_image() -> str:
    """A small JPEG (base64) for the logged model's input example."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 120, 40)).save(buffer, format="JPEG")
    return encode(buffer.getvalue())


def requirements() -> list[str]:
    """What the model needs to load and predict, pinned to the versions that logged it."""
    return [f"{name}=={version.split('+')[0]}" for name, version in (
        ("torch", torch.__version__), ("torchvision", torchvision.__version__), ("pillow", PIL.__version__),
        ("numpy", np.__version__), ("pandas", pd.__version__), ("mlflow", mlflow.__version__))]


def served_limits(params) -> dict:
    """The limits registered with the model (limits.json): the largest image file and image."""
    return {"max_image_mb": params.serve.max_image_mb, "max_pixels": params.validate_.max_pixels}


class _PyfuncAndPytorch:
    """A flavour module for ``mlflow.models.Model.log``: MLflow's pyfunc, with MLflow's pytorch
    flavour declared over the pyfunc's own copy of the network (so the weights are stored once)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        mlflow_model.add_flavor("pytorch", model_data=NETWORK_DATA, pytorch_version=str(torch.__version__), code=None)
        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


def log_classifier(checkpoint: Path, params_file: Path, limits: dict) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as the model ``classifier`` in the active run: its code
    (portable_model.py with finetune/data/portable.py), the network as a pickled torchvision
    module (read by both the pyfunc and the pytorch flavour), model.json (classes, settings,
    origin), params.yaml, and ``limits`` as limits.json (not as model_config, which MLflow also
    logs as params of the run, where serving limits would pass for training settings)."""
    classifier = load_classifier(checkpoint)
    card = {"classes": classifier.classes, "settings": classifier.settings, "info": classifier.info}
    with tempfile.TemporaryDirectory(prefix="finetune-classifier-") as folder:
        folder = Path(folder)
        (folder / "network").mkdir()
        torch.save(classifier.model, folder / "network" / portable_model.NETWORK_FILE, pickle_module=pickle)
        (folder / "network" / "pickle_module_info.txt").write_text(pickle.__name__)
        (folder / "model.json").write_text(json.dumps(card, default=str))
        (folder / "limits.json").write_text(json.dumps(limits))
        return mlflow.models.Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=_PyfuncAndPytorch, flavor_name="pyfunc.ModelFromCode",
            python_model=portable_model.__file__, code_paths=[data_portable.__file__],
            artifacts={"network": str(folder / "network"), "model": str(folder / "model.json"),
                       "params": str(params_file), "limits": str(folder / "limits.json")},
            signature=SIGNATURE, input_example=pd.DataFrame({IMAGE_COLUMN: [example_image()]}),
            pip_requirements=requirements())
