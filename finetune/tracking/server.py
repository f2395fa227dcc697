"""`python -m finetune serve`: the scoring app (finetune/tracking/serving.py) run by uvicorn, with
the deadlines that keep stalled clients from holding the server, and the served alias followed.

- A connection must deliver a request's head within ``serve.read_timeout_s`` of opening (or of
  its previous answer), else it is closed; the body must follow within ``serve.read_timeout_s``
  of the head, else 408 (RequestSizeLimit). Idle keep-alive connections close after
  ``serve.keep_alive_s``; beyond ``serve.max_connections`` open at once, requests get 503.
- A served ``models:/<name>@<alias>`` is looked up every ``serve.refresh_s``: when the alias has
  moved, the new version is loaded beside the old one (which goes on answering), then swapped in
  for the next requests. A version that does not load is not swapped in: the old one stays, with
  a warning in the log. Every answer names the version that gave it (header ``X-Model-Version``).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune.core.config import ServeConfig, load_params
from finetune.core.errors import FinetuneError
from finetune.tracking.portable_model import IMAGE_COLUMN
from finetune.tracking.serving import load_served, scoring_app
from finetune.tracking.store import use_store

log = logging.getLogger(__name__)
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
VERSION_HEADER = b"x-model-version"


def head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request head has not arrived
    ``seconds`` after the connection opened or its last answer was sent (uvicorn has no such
    deadline: a client that sends half a head would hold its connection for good)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()

        def arm(self) -> None:
            self.loop.call_later(seconds, self.overdue, self.cycle)

        def overdue(self, cycle) -> None:
            # Still the same request cycle, answered (or none yet): no new head came in time.
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


class FollowedModel:
    """ASGI app: the scoring app of the model ``uri`` names; for an alias URI, the app of the
    version the alias names, replaced by :meth:`refresh` when the alias moves."""

    def __init__(self, uri: str, project: Path, limits: ServeConfig):
        self.uri, self.project, self.limits = uri, project, limits
        use_store(project)
        try:
            self.version = self.resolve()
        except MlflowException as err:
            raise FinetuneError(f"cannot load the model {uri} from {mlflow.get_tracking_uri()}: {err.message}. "
                                "Register and promote one first (`dvc repro`, then `python -m finetune promote`).") from None
        self.app = scoring_app(load_served(self.versioned(self.version), project), limits)

    async def __call__(self, scope, receive, send) -> None:
        app, version = self.app, self.version  # one request, one model: a swap applies to the next ones
        if scope["type"] != "http" or version is None:
            return await app(scope, receive, send)

        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), (VERSION_HEADER, version.encode())]}
            await send(message)

        await app(scope, receive, named)

    def resolve(self) -> str | None:
        """The version the served alias names now (None: the URI is no alias)."""
        match = ALIAS_URI.match(self.uri)
        if match is None:
            return None
        return str(MlflowClient().get_model_version_by_alias(match["name"], match["alias"]).version)

    def versioned(self, version: str | None) -> str:
        return self.uri if version is None else f"models:/{ALIAS_URI.match(self.uri)['name']}/{version}"

    def refresh(self) -> bool:
        """Load and swap in the alias's version if it moved; False when nothing changed or the new
        version cannot be used (the old one keeps answering; the log says why)."""
        try:
            version = self.resolve()
            if version == self.version:
                return False
            app = scoring_app(load_served(self.versioned(version), self.project), self.limits)
        except Exception as err:  # the store unreachable, a version that does not load: keep serving
            log.warning("%s: keeping version %s (%s)", self.uri, self.version, str(err).strip().splitlines()[0][:300])
            return False
        log.warning("%s moved from version %s to %s: now serving version %s", self.uri, self.version, version, version)
        self.app, self.version = app, version
        return True

    def follow(self, stop: threading.Event) -> None:
        """Refresh every ``serve.refresh_s`` until ``stop`` is set (a thread's work)."""
        while not stop.wait(self.limits.refresh_s):
            self.refresh()


def serve(uri: str, host: str, port: int, project: Path = Path("."), limits: ServeConfig | None = None) -> None:
    """Serve ``uri`` (tracking store: the project's) on host:port until stopped (SIGTERM, Ctrl-C);
    ``limits``: the ``serve:`` section (default: the project's params.yaml)."""
    import uvicorn

    limits = limits or load_params(project / "params.yaml").serve
    model = FollowedModel(uri, project, limits)  # a bad URI fails here, with a clear message
    stop = threading.Event()
    if model.version is not None and limits.refresh_s > 0:
        threading.Thread(target=model.follow, args=(stop,), name="follow-alias", daemon=True).start()
    shown = f"{uri} (version {model.version})" if model.version else uri
    print(f"serving {shown} on http://{host}:{port}/invocations (POST {{\"dataframe_records\": "
          f"[{{\"{IMAGE_COLUMN}\": \"<base64 image>\"}}]}})", flush=True)
    try:
        uvicorn.run(model, host=host, port=port, workers=1, log_level="info", http=head_deadline_protocol(
            limits.read_timeout_s), timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections)
    finally:
        stop.set()
