"""The served model: an MLflow pyfunc that takes encoded images (base64 JPEG/PNG/... in a column
``image``) and returns, per image, the class, its probability and every class's probability.

It carries its own preprocessing (the training's test transform, ImageNet statistics) and its
limits, so a client sends the file's bytes and nothing else. `python -m finetune serve` runs
MLflow's own scoring app (the one `mlflow models serve` runs) in uvicorn, behind a request-size
limit: ``POST /invocations`` with ``{"dataframe_records": [{"image": "<base64>"}]}``; a body over
serve.max_request_mb is a 413 before it is read, a bad image is a 400 naming the row and the
reason (sizes checked on the header, before decoding), and the server goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
import PIL
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from finetune.config import Params, ServeConfig, load_params
from finetune.errors import FinetuneError
from finetune.evaluate.figures import errors_figure, save_png
from finetune.evaluate.metrics import VariantEval
from finetune.evaluate.scoring import evaluate_classifier
from finetune.model.classifier import ImageError, decode_image, describe, load_classifier, probabilities
from finetune.tracking.store import use_store

# Models registered before the package was split into folders pickled this class as
# finetune.serving.ImageClassifierModel: let them load in any process that imports this module.
sys.modules.setdefault("finetune.serving", sys.modules[__name__])
IMAGE_COLUMN = "image"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]))


def encode(data: bytes) -> str:
    """The base64 text a client puts in the ``image`` column."""
    return base64.b64encode(data).decode("ascii")


def decode_base64(text: str, source: str) -> bytes:
    if not isinstance(text, str):
        raise ImageError(f"{source}: expected base64 text in column {IMAGE_COLUMN!r}, got {type(text).__name__}.")
    if text.startswith("data:") and "," in text:  # a data URL as browsers write it
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{source}: column {IMAGE_COLUMN!r} is not base64; send base64(file bytes).") from None


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Images in, classes and probabilities out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.classifier = load_classifier(Path(context.artifacts["checkpoint"]))
        limits = context.model_config or {}
        self.max_bytes = int(float(limits.get("max_image_mb", 20)) * 2**20)
        self.max_pixels = int(limits.get("max_pixels", Image.MAX_IMAGE_PIXELS or 89_478_485))
        self.pixels_setting = "validate.max_pixels"

    def apply_limits(self, limits: ServeConfig) -> None:
        """The server's limits (``serve:``): the image size, and the pixels if stricter than the
        registered validate.max_pixels."""
        self.max_bytes = int(limits.max_image_mb * 2**20)
        if limits.max_pixels < self.max_pixels:
            self.max_pixels, self.pixels_setting = limits.max_pixels, "serve.max_pixels"

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({IMAGE_COLUMN: model_input})
        if IMAGE_COLUMN not in frame.columns or frame.empty:
            raise MlflowException(f"send one or more rows with a column {IMAGE_COLUMN!r} (base64 image bytes)",
                                  error_code=INVALID_PARAMETER_VALUE)
        try:
            images = [decode_image(decode_base64(value, f"row {i}"), f"row {i}", self.max_bytes, self.max_pixels,
                                   self.pixels_setting) for i, value in enumerate(frame[IMAGE_COLUMN])]
        except ImageError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return describe(self.classifier.classes, probabilities(self.classifier, images))


def example_image() -> str:
    """A small JPEG (base64) for the logged model's input example."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 120, 40)).save(buffer, format="JPEG")
    return encode(buffer.getvalue())


def log_classifier(checkpoint: Path, params_file: Path, limits: dict) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a servable pyfunc ``classifier`` in the active run (with params.yaml)."""
    return mlflow.pyfunc.log_model(
        name="classifier", python_model=ImageClassifierModel(),
        artifacts={"checkpoint": str(checkpoint), "params": str(params_file)},
        model_config=limits, signature=SIGNATURE,
        input_example=pd.DataFrame({IMAGE_COLUMN: [example_image()]}),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}",
                          f"pillow=={PIL.__version__}", f"mlflow=={mlflow.__version__}"])


def predict_files(model, files: Sequence[Path]) -> list[dict]:
    """``{"file", "class", "confidence", "probabilities"}`` or ``{"file", "error"}`` per file,
    scored by the pyfunc ``model`` exactly as the server scores a posted image."""
    results = []
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            results.append({"file": str(path), "error": f"cannot read it ({err.strerror})"})
            continue
        try:
            (row,) = model.predict(pd.DataFrame({IMAGE_COLUMN: [encode(data)]}))
        except MlflowException as err:
            results.append({"file": str(path), "error": err.message.replace("row 0", str(path))})
            continue
        results.append({"file": str(path), **row})
    return results


def load_served(uri: str, project: Path = Path(".")):
    """The pyfunc model at ``uri`` (models:/name@alias, runs:/..., a folder) from the project's store."""
    use_store(project)
    try:
        # The model holds its weights in memory once loaded; without dst_path MLflow downloads
        # into a temporary folder that it never removes (45 MB per load for ResNet-18).
        with tempfile.TemporaryDirectory(prefix="finetune-model-") as folder:
            return mlflow.pyfunc.load_model(uri, dst_path=folder)
    except MlflowException as err:
        raise FinetuneError(f"cannot load the model {uri} from {mlflow.get_tracking_uri()}: {err.message}. "
                            "Register and promote one first (`dvc repro`, then `python -m finetune promote`).") from None


class RequestSizeLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` (declared in Content-Length, or
    counted while it streams in) is answered 413 before the app reads or parses any of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await answer(send, 400, f"Content-Length {declared.decode(errors='replace')!r} is not a number.")
        if declared is not None and int(declared) > self.max_bytes:
            return await self.refuse(send, f"declares {int(declared)} bytes")
        chunks, size = [], 0
        while True:  # the body, counted as it arrives (chunked requests declare no length)
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(send, f"sent more than {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        del chunks
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the app waits for a disconnect after the body: pass it on
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            release_memory()

    async def refuse(self, send, what: str) -> None:
        await answer(send, 413, f"the request {what}, over the limit of {self.max_bytes / 2**20:.1f} MB "
                                "(serve.max_request_mb); send fewer or smaller images per request.")


async def answer(send, status: int, message: str) -> None:
    """An MLflow-style JSON error (``error_code``, ``message``); the connection closes after it,
    since the rest of the body is never read."""
    body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: the decoded images
    and request bodies of every request made the server's RSS climb and stay)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def scoring_app(model, limits: ServeConfig):
    """MLflow's scoring app (/invocations, /ping, /health, /version) for the loaded pyfunc
    ``model``, with the ``serve:`` limits applied to the model and to request bodies."""
    from mlflow.pyfunc import scoring_server

    model.unwrap_python_model().apply_limits(limits)
    return RequestSizeLimit(scoring_server.init(model), int(limits.max_request_mb * 2**20))


def serve(uri: str, host: str, port: int, project: Path = Path("."), limits: ServeConfig | None = None) -> None:
    """Serve ``uri`` (tracking store: the project's) on host:port until stopped (SIGTERM, Ctrl-C);
    ``limits``: the ``serve:`` section (default: the project's params.yaml)."""
    import uvicorn

    limits = limits or load_params(project / "params.yaml").serve
    app = scoring_app(load_served(uri, project), limits)  # a bad URI fails here, with a clear message
    print(f"serving {uri} on http://{host}:{port}/invocations (POST {{\"dataframe_records\": "
          f"[{{\"{IMAGE_COLUMN}\": \"<base64 image>\"}}]}})", flush=True)
    uvicorn.run(app, host=host, port=port, workers=1, log_level="info")


def evaluate_registered(params: Params, uri: str, project: Path = Path(".")) -> VariantEval:
    """A registered model (``models:/name@alias``, ``models:/name/3``, ...) on the current test split."""
    classifier = load_served(uri, project).unwrap_python_model().classifier
    return evaluate_classifier(uri, classifier, project / params.data.dir, project / params.validate_.files,
                               params.evaluate)


def errors_of_model(params: Params, uri: str, out: Path | None, project: Path = Path(".")) -> tuple[Path, int, int]:
    """The error grid of a registered model (e.g. production) on the current test split."""
    result = evaluate_registered(params, uri, project)
    out = out or project / params.evaluate.plots / "errors_production.png"
    wrong = int((result.predicted != result.truth).sum())
    save_png(errors_figure(result, project / params.data.dir, params.evaluate.errors_shown,
                        f"{uri}: {wrong} of {len(result.truth)} test images misclassified"), out)
    return out, wrong, len(result.truth)
