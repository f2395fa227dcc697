"""The served model: an MLflow pyfunc that takes encoded images (base64 JPEG/PNG/... in a column
``image``) and returns, per image, the class, its probability and every class's probability.

It carries its own preprocessing (the training's test transform, ImageNet statistics) and its
limits, so a client sends the file's bytes and nothing else. `python -m finetune serve` runs
MLflow's own scoring app (the one `mlflow models serve` runs) in uvicorn, behind a request-size
limit: ``POST /invocations`` with ``{"dataframe_records": [{"image": "<base64>"}]}``.

Answers are per row: ``{"predictions": [{"class", "confidence", "probabilities"}, {"error":
"row 1: ..."}, ...]}``, in request order. A bad image (not base64, not an image, over
serve.max_image_mb, or over the pixel limit: sizes checked on the header, before decoding) is an
error entry naming its row and the reason; the other rows are scored. HTTP 200 when at least one
row was scored; 400 when none was, or when the request as a whole is malformed (not JSON, no
``image`` column, no rows); 413 for a body over serve.max_request_mb, before it is read; 408 for
a body not all there serve.read_timeout_s after the head (finetune/tracking/server.py runs it). Error
messages never repeat the request's data nor Python object reprs, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import io
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from finetune.core.config import ModelConfig, Params, ServeConfig
from finetune.core.errors import FinetuneError, plain_error
from finetune.data import portable as data_portable
from finetune.evaluate.figures import errors_figure, save_png
from finetune.evaluate.metrics import VariantEval
from finetune.evaluate.scoring import evaluate_classifier
from finetune.model.classifier import Classifier, load_classifier
from finetune.tracking import portable_model
from finetune.tracking.packaging import encode, log_classifier, requirements  # noqa: F401 (the served API)
from finetune.tracking.portable_model import ERROR_KEY, IMAGE_COLUMN, decode_base64  # noqa: F401 (the served API)
from finetune.tracking.store import use_store

# Models registered before the package was split into folders pickled this class as
# finetune.serving.ImageClassifierModel: let them load in any process that imports this module.
sys.modules.setdefault("finetune.serving", sys.modules[__name__])
REQUEST_SHAPE = f'send {{"dataframe_records": [{{"{IMAGE_COLUMN}": "<base64 of the image file>"}}, ...]}}'
# What error messages must not carry: Python object reprs ("<_io.BytesIO object at 0x7f...>",
# removed by plain_error), and any long unbroken run of characters, which can only be a slice
# of the request (base64).
LONG_RUN = re.compile(r"\S{41,}")
MESSAGE_CHARS = 600
SHOWN_ROWS = 5  # row errors quoted in the message of a batch where no row could be scored


class ImageClassifierModel(portable_model.ImageClassifierModel):
    """Versions registered before each model shipped its own code pickled this class, with the
    train stage's checkpoint as the artifact ``checkpoint``: they load where this project is
    installed (and only there). `python -m finetune doctor` names them and the commands that
    register the same model again, portable."""

    def load_context(self, context) -> None:
        classifier = load_classifier(Path(context.artifacts["checkpoint"]))
        self.network, self.classes, self.transform = classifier.model, classifier.classes, classifier.transform
        self.settings, self.info = classifier.settings, classifier.info
        # limits.json since the limits stopped being logged as the training run's params; models
        # registered before carry them as model_config.
        limits = context.model_config or {}
        if "limits" in context.artifacts:
            limits = json.loads(Path(context.artifacts["limits"]).read_text())
        self.registered_limits(limits)


def served_classifier(model) -> Classifier:
    """The network, classes and preprocessing inside a loaded pyfunc (portable or older)."""
    inner = model.unwrap_python_model()
    return Classifier(inner.network, list(inner.classes), ModelConfig.model_validate(inner.settings["model"]),
                      inner.settings, inner.info)


def portable(model) -> bool:
    """Whether a loaded pyfunc carries its own code (loads where this project is not installed)."""
    return type(model.unwrap_python_model()) is not ImageClassifierModel


def predict_files(model, files: Sequence[Path], batch: int = 32) -> list[dict]:
    """``{"file", "class", "confidence", "probabilities"}`` or ``{"file", "error"}`` per file,
    scored by the pyfunc ``model`` exactly as the server scores a posted batch (``batch`` files
    per call: one bad file does not stop the others)."""
    results: list[dict] = []
    readable: list[tuple[int, Path, bytes]] = []
    for path in map(Path, files):
        try:
            readable.append((len(results), path, path.read_bytes()))
            results.append({"file": str(path)})
        except OSError as err:
            results.append({"file": str(path), ERROR_KEY: f"cannot read it ({err.strerror})"})
    for start in range(0, len(readable), batch):
        chunk = readable[start:start + batch]
        try:
            answers = model.predict(pd.DataFrame({IMAGE_COLUMN: [encode(data) for _, _, data in chunk]}))
        except MlflowException as err:  # the batch as a whole (not one image) was refused
            answers = [{ERROR_KEY: clean_message(err.message)}] * len(chunk)
        for row, ((i, path, _), answer) in enumerate(zip(chunk, answers, strict=True)):
            if ERROR_KEY in answer:  # "row 3: not an image ..." -> "<file>: not an image ..."
                answer = {ERROR_KEY: answer[ERROR_KEY].replace(f"row {row}:", f"{path}:", 1)}
            results[i].update(answer)
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
    counted while it streams in) is answered 413 before the app reads or parses any of it; one
    whose body has not all arrived ``read_timeout_s`` after its head is answered 408 (a stalled
    client holds a connection and its buffers no longer than that)."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float | None = None):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            shown = declared[:20].decode(errors="replace")  # a header, but still the client's text: cut short
            return await answer(send, 400, f"Content-Length {shown!r} is not a number.")
        if declared is not None and int(declared) > self.max_bytes:
            return await self.refuse(send, f"declares {int(declared)} bytes")
        try:
            body = await asyncio.wait_for(self.read_body(receive), self.read_timeout_s)
        except asyncio.TimeoutError:
            return await answer(send, 408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                           "(serve.read_timeout_s); send the whole request at once.")
        if isinstance(body, str):  # why the body was refused, or "" for a client gone
            return await self.refuse(send, body) if body else None
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

    async def read_body(self, receive) -> bytes | str:
        """The body, counted as it arrives (chunked requests declare no length); a str instead:
        why it is refused (over max_bytes), or "" when the client disconnected."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return ""
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return f"sent more than {self.max_bytes} bytes"
            if not message.get("more_body"):
                return b"".join(chunks)

    async def refuse(self, send, what: str) -> None:
        await answer(send, 413, f"the request {what}, over the limit of {self.max_bytes / 2**20:.1f} MB "
                                "(serve.max_request_mb); send fewer or smaller images per request.")


async def answer(send, status: int, message: str) -> None:
    """An MLflow-style JSON error (``error_code``, ``message``); the connection closes after it,
    since the rest of the body is never read."""
    code = "REQUEST_TIMEOUT" if status == 408 else "BAD_REQUEST"
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def clean_message(message: str) -> str:
    """An error message fit to send back: what went wrong, without the request's data (MLflow
    quotes the whole input frame, or the raw body, in its messages), object reprs or tracebacks."""
    text = str(message)
    if text.startswith("Failed to predict data '"):  # "... '<the input frame>'. \nError: <why>"
        text = text.rpartition("'. \nError: ")[2]
    if text.startswith("Failed to enforce schema of data '"):  # "... '<frame>' with schema '...'. Error: <why>"
        text = f"the rows do not match the model's input ({text.rpartition(chr(39) + '. Error: ')[2]})"
    text = text.split("\nInput:", 1)[0].split(" IMPORTANT:", 1)[0]  # MLflow appends the body, then a lecture
    text = LONG_RUN.sub("[...]", plain_error(text)).strip()
    text = " ".join(text.split())  # one line
    if len(text) > MESSAGE_CHARS:
        text = text[:MESSAGE_CHARS - 5] + " [...]"
    if not text.startswith("row "):
        text = text.rstrip(".") + f"; {REQUEST_SHAPE}."
    return text


def per_row_answer(status: int, body: bytes) -> tuple[int, bytes]:
    """The scoring app's answer made fit to send: a batch where no row could be scored is a 400
    quoting the rows' errors; an error's message is cleaned (clean_message) and its traceback dropped."""
    try:
        answer = json.loads(body)
    except ValueError:  # plain text (415, 504): it quotes no data
        return status, body
    if not isinstance(answer, dict):
        return status, body
    rows = answer.get("predictions")
    failed = isinstance(rows, list) and rows and all(isinstance(row, dict) and ERROR_KEY in row for row in rows)
    if status == 200 and failed:
        errors = [row[ERROR_KEY] for row in rows]
        message = errors[0] if len(errors) == 1 else (
            f"none of the {len(errors)} rows could be scored: " + "; ".join(errors[:SHOWN_ROWS])
            + (f"; and {len(errors) - SHOWN_ROWS} more" if len(errors) > SHOWN_ROWS else ""))
        return 400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
    if status >= 400 and "message" in answer:
        code = answer.get("error_code", "BAD_REQUEST")
        return status, json.dumps({"error_code": code, "message": clean_message(answer["message"])}).encode()
    return status, body


class PerRowAnswers:
    """ASGI middleware over the scoring app's /invocations: its answer passes through
    per_row_answer before it is sent (other paths are left as they are)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def hold(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    status, body = per_row_answer(start["status"], b"".join(chunks))
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    await send({"type": "http.response.start", "status": status,
                                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, hold)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: the decoded images
    and request bodies of every request made the server's RSS climb and stay)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def scoring_app(model, limits: ServeConfig):
    """MLflow's scoring app (/invocations, /ping, /health, /version) for the loaded pyfunc
    ``model``, with the ``serve:`` limits applied to the model and to request bodies, and its
    answers per row (PerRowAnswers)."""
    from mlflow.pyfunc import scoring_server

    model.unwrap_python_model().apply_limits(limits)
    return RequestSizeLimit(PerRowAnswers(scoring_server.init(model)), int(limits.max_request_mb * 2**20),
                            limits.read_timeout_s)


def evaluate_registered(params: Params, uri: str, project: Path = Path("."), model=None) -> VariantEval:
    """A registered model (``models:/name@alias``, ``models:/name/3``, ...) on the current test
    split; ``model``: that model already loaded (not loaded again)."""
    classifier = served_classifier(model or load_served(uri, project))
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
