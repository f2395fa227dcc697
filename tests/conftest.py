"""Shared test fixtures: a real HTTP server on 127.0.0.1, real zip archives of real JPEGs."""

from __future__ import annotations

import hashlib
import json
import io
import os
import re
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri() -> Iterator[None]:
    """MLflow's set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: a test that points
    MLflow at its own store must not point the stage processes of later tests there too."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@dataclass
class Route:
    """How the test server answers one path.

    ``bodies[i]`` is served to the i-th successful request (the last one repeats);
    ``fail_first`` requests get HTTP ``fail_status``; ``drop_first`` full responses are cut
    off half-way; ``ranges`` says whether Range requests are honoured (206) or ignored (200).
    """

    bodies: list[bytes]
    content_type: str = "application/zip"
    fail_first: int = 0
    fail_status: int = 500
    drop_first: int = 0
    ranges: bool = True
    hits: int = 0
    served: int = 0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class TestServer:
    """A real threaded HTTP server; tests add routes and read back the requests it saw."""

    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, *bodies: bytes, **options) -> str:
        self.routes[path] = Route(list(bodies), **options)
        return self.url(path)

    def statuses(self, path: str) -> list[int]:
        return [request.status for request in self.requests if request.path == path]


def _handler(server: TestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            request = Request(self.path, dict(self.headers))
            server.requests.append(request)
            route = server.routes.get(self.path)
            if route is None:
                return self._plain(request, 404, b"not found")
            route.hits += 1
            if route.hits <= route.fail_first:
                return self._plain(request, route.fail_status, b"server error")
            body = route.bodies[min(route.served, len(route.bodies) - 1)]
            route.served += 1
            start = self._range_start(route, len(body))
            if start is None:
                return self._plain(request, 416, b"range not satisfiable")
            request.status = 206 if start else 200
            self.send_response(request.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            payload = body[start:]
            if route.served <= route.drop_first:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

        def _range_start(self, route: Route, size: int) -> int | None:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if not (route.ranges and match):
                return 0
            start = int(match.group(1))
            return start if start < size else None

        def _plain(self, request: Request, status: int, body: bytes) -> None:
            request.status = status
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client hanging up (after an error status, or a test cut short) is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    """Prefect on its own ephemeral server, with its state in a temporary folder."""
    from finetune.demo.workspace import stage_env

    env = stage_env()
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # A torch hub cache that holds the ImageNet weights' file name, so that the pipeline's
    # preflight (which resolves the weights' host only when the file is missing) passes alike on
    # machines with and without DNS; nothing run with this environment loads ImageNet weights.
    hub = tmp_path_factory.mktemp("torch")
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    (hub / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"not loaded by these tests")
    env["TORCH_HOME"] = str(hub)
    return env


@pytest.fixture
def http_server() -> Iterator[TestServer]:
    """A real HTTP server on 127.0.0.1 (a free port), stopped after the test."""
    state = TestServer(port=0)
    httpd = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    """A real JPEG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]],
             compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip archive in memory from {name: data} or from (name or ZipInfo, data) pairs."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        items = entries.items() if isinstance(entries, dict) else entries
        for name, data in items:
            zf.writestr(name, data)
    return buffer.getvalue()


def dataset_zip(variant: int = 0, root: str = "hotdog") -> bytes:
    """A tiny valid dataset archive of the hotdog.zip layout; ``variant`` changes the pixels."""
    entries = {}
    for split, count, shift in (("train", 3, 0), ("test", 2, 21)):  # no test image equals a train one
        for label, base in (("hotdog", (200, 60, 40)), ("not-hotdog", (40, 90, 200))):
            for i in range(count):
                color = tuple((channel + 7 * i + shift + 50 * variant) % 256 for channel in base)
                entries[f"{root}/{split}/{label}/{i:04d}.jpg"] = jpeg(color)
    return make_zip(entries)


# Settings under which dataset_zip()'s few tiny images pass validation and train in seconds.
TINY_TRAIN = {"model.weights": "none", "model.train_crop": 16, "model.test_resize": 16, "model.test_crop": 16,
              **{f"train.{variant}.{key}": value for variant in ("finetune", "scratch")
                 for key, value in (("epochs", 1), ("batch_size", 4), ("max_steps", 1), ("workers", 0))},
              # Every one of the few images trains: held out, 2 of 3 per class would leave one image
              # per class, and one step on 2 images at 16 px (a 1-pixel last stage) can wreck
              # BatchNorm's statistics. Validation is tested where there are images to spare.
              "train_defaults.val_fraction": 0, "train_defaults.select": "last", "evaluate.workers": 0,
              "train_defaults.checkpoint_every_s": 0,  # seconds-long trainings checkpoint every epoch
              # One step on six images cannot learn: these tests check machinery, not judgment
              # (tests/train/test_judgment.py trains models that can), so no search and no verdict
              # on epochs (a loss that is not a number still fails).
              "search.enabled": False, "train_defaults.judge_epochs": False, "train_defaults.min_steps": 0}
TINY_DATA = {"validate.min_side": 8, "validate.min_images_per_class": 2, "validate.expected_per_class": None,
             **TINY_TRAIN, **{"evaluate.chance_p": 0.99}}
# Why the chance floor is nearly off in TINY_DATA: on dataset_zip()'s 4 test images no model can
# beat chance at 0.01 (4 of 4 right at 1/2 is p = 0.0625), so register would register nothing and
# the gate judge nothing. The tests that use it check the pipeline's plumbing (DVC, Prefect, the
# registry), so any model that gets one test image right passes; the floor itself is tested on
# models with known answers (tests/evaluate/test_chance.py, tests/tracking/test_registry.py).


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``root`` (empty if it does not exist)."""
    if not root.exists():
        return {}
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a real ``dvc`` command in ``workspace``; with ``check``, it must succeed."""
    from finetune.demo.workspace import stage_env

    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=stage_env(),
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or times out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    process.terminate()
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def start_server(command: list[str], health: str, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen:
    """A real server process (output to ``log``), once ``health`` answers."""
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                               start_new_session=True)
    handle.close()
    wait_for_http(health, process, log)
    return process


def stop_server(process: subprocess.Popen) -> None:
    import os
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1: SQLite backend, a temporary artifact root; its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    process = start_server(command, f"http://127.0.0.1:{port}/health", root / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


@pytest.fixture
def json_receiver() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server on 127.0.0.1 that records JSON POSTs (each with its ``path``), answering
    200, or 500 at /broken: its ``127.0.0.1:<port>`` and the bodies received."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, **body})
            self.send_response(500 if self.path == "/broken" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
