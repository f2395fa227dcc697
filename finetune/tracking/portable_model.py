"""The registered model's code (MLflow's "models from code"): images in, classes and
probabilities out, in any MLflow client with the model's requirements, where this project is not
installed.

Each registered version ships this file (its ``python_model``) and finetune/data/portable.py (its
``code_paths``), and as artifacts the trained network (a pickled torchvision module:
``network/model.pth``), ``model.json`` (classes, the settings that made it, where it came from)
and ``limits.json``. Nothing here imports the project: keep it so (tests/tracking/
test_portable_model.py loads a version in a process where ``finetune`` cannot be imported).

Input: a column ``image`` of base64 image files. Output, per row in order: ``{"class",
"confidence", "probabilities"}``, or ``{"error": "row i: why"}`` for an image that cannot be
used (the other rows are scored all the same).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

try:  # inside a registered model: portable.py ships beside this file, in the model's code/ folder
    import portable
except ImportError:  # in the project, before any model is loaded
    from finetune.data import portable

IMAGE_COLUMN = "image"
ERROR_KEY = "error"  # a row that could not be scored: {"error": "row <i>: <why>"}
NETWORK_FILE = "model.pth"  # in the artifact ``network``: the layout of MLflow's pytorch flavour


def decode_base64(text: str, source: str) -> bytes:
    """The file bytes of one ``image`` cell (base64, or a data URL as browsers write it)."""
    if not isinstance(text, str):
        raise portable.ImageError(f"{source}: expected base64 text in column {IMAGE_COLUMN!r}, "
                                  f"got {type(text).__name__}.")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise portable.ImageError(f"{source}: column {IMAGE_COLUMN!r} is not base64; send base64(file bytes).") from None


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Images in, classes and probabilities out (see the module docstring)."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["network"])
        # The project's own network, written by the project: a pickled torchvision module.
        self.network = torch.load(folder / NETWORK_FILE if folder.is_dir() else folder,
                                  map_location="cpu", weights_only=False).eval()
        card = json.loads(Path(context.artifacts["model"]).read_text())
        self.classes, self.settings, self.info = card["classes"], card["settings"], card["info"]
        m = self.settings["model"]
        self.transform = portable.eval_transform(m["test_resize"], m["test_crop"], m["resize_mode"])
        self.registered_limits(json.loads(Path(context.artifacts["limits"]).read_text()))

    def registered_limits(self, limits: dict) -> None:
        """The limits registered with the model (``max_image_mb``, ``max_pixels``; Pillow's own
        pixel limit and 20 MB where one is missing)."""
        self.set_limits(limits.get("max_image_mb", 20), limits.get("max_pixels", Image.MAX_IMAGE_PIXELS or 89_478_485))

    def set_limits(self, max_image_mb: float, max_pixels: int, pixels_setting: str = "validate.max_pixels") -> None:
        """The largest image accepted: its file size, and its width x height (``pixels_setting``
        is the key named in a refusal)."""
        self.max_bytes = int(float(max_image_mb) * 2**20)
        self.max_pixels, self.pixels_setting = int(max_pixels), pixels_setting

    def apply_limits(self, limits) -> None:
        """A server's limits (``serve:`` of params.yaml): the image size, and the pixels if stricter
        than the registered validate.max_pixels."""
        stricter = limits.max_pixels < self.max_pixels
        self.set_limits(limits.max_image_mb, min(limits.max_pixels, self.max_pixels),
                        "serve.max_pixels" if stricter else self.pixels_setting)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        """One answer per row, in order: the class and probabilities, or ``{"error": "row i: why"}``
        for a row whose image cannot be used (the other rows are scored all the same)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({IMAGE_COLUMN: model_input})
        if IMAGE_COLUMN not in frame.columns or frame.empty:
            raise MlflowException(f"send one or more rows with a column {IMAGE_COLUMN!r} (base64 image bytes)",
                                  error_code=INVALID_PARAMETER_VALUE)
        answers: list[dict | None] = [None] * len(frame)
        images = {}
        for i, value in enumerate(frame[IMAGE_COLUMN]):
            try:
                images[i] = portable.decode_image(decode_base64(value, f"row {i}"), f"row {i}", self.max_bytes,
                                                  self.max_pixels, self.pixels_setting)
            except portable.ImageError as err:
                answers[i] = {ERROR_KEY: " ".join(str(err).split())}
        probs = portable.probabilities(self.network, self.transform, list(images.values()), len(self.classes))
        for i, answer in zip(images, portable.describe(self.classes, probs), strict=True):
            answers[i] = answer
        return answers


mlflow.models.set_model(ImageClassifierModel())
