"""Who may use the stack's MLflow server: its basic-auth app with three users, their passwords
generated at the first `make stack` (stack.json, mode 600). ``admin`` administers;
``pipeline`` (what the worker, the stages and env.sh use) creates experiments and registered
models, and so holds MANAGE on them, which moving ``production`` needs; ``reader`` reads
everything (the default permission) and changes nothing."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

from stack.postgres import MLFLOW_DRIVER, StackError
from stack.services import ADMIN, PIPELINE, READER, Stack, write_private

AUTH_DATABASE = "mlflow_auth"  # the users and permissions, beside the tracking database


def config(stack: Stack) -> Path:
    """Write the auth app's configuration (it holds the admin's password and the database URL)."""
    path = stack.root / "mlflow-auth.ini"
    write_private(path, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {stack.postgres.url(AUTH_DATABASE, MLFLOW_DRIVER)}",
        f"admin_username = {ADMIN}",
        # Used once, when the user store is empty: the admin never has MLflow's default password.
        f"admin_password = {stack.secrets[ADMIN]}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
    ]) + "\n")
    return path


def call(stack: Stack, method: str, endpoint: str, user: str, body: dict | None = None) -> tuple[int, dict]:
    """One request to the MLflow server as ``user``: its status and JSON answer."""
    token = base64.b64encode(f"{user}:{stack.secrets[user]}".encode()).decode()
    request = urllib.request.Request(f"{stack.urls()['MLflow']}{endpoint}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def ensure_users(stack: Stack) -> None:
    """Create ``pipeline`` and ``reader`` with their generated passwords (once)."""
    for user in (PIPELINE, READER):
        status, _ = call(stack, "GET", f"/api/2.0/mlflow/users/get?username={user}", ADMIN)
        if status == 200:
            continue
        status, _ = call(stack, "POST", "/api/2.0/mlflow/users/create", ADMIN,
                         {"username": user, "password": stack.secrets[user]})
        if status != 200:
            raise StackError(f"the MLflow server refused to create the user {user!r} (HTTP {status}); its log: "
                             f"{stack.log('mlflow')}. If its users were made by another stack folder, restore "
                             f"that folder's stack.json, or start from a fresh folder.")


def grant_pipeline(stack: Stack) -> None:
    """MANAGE for ``pipeline`` on every experiment and registered model: the Default experiment,
    and those made before the stack had users or restored from a backup (it owns what it creates)."""
    _, found = call(stack, "GET", "/api/2.0/mlflow/experiments/search?max_results=1000", ADMIN)
    targets = [("experiment", experiment["experiment_id"]) for experiment in found.get("experiments", [])]
    _, found = call(stack, "GET", "/api/2.0/mlflow/registered-models/search?max_results=1000", ADMIN)
    targets += [("registered_model", model["name"]) for model in found.get("registered_models", [])]
    for kind, resource in targets:
        status, _ = call(stack, "POST", "/api/3.0/mlflow/users/permissions/grant", ADMIN,
                         {"username": PIPELINE, "resource_type": kind, "resource_id": resource, "permission": "MANAGE"})
        if status not in (200, 400, 409):  # 400/409: granted before, which is what was wanted
            raise StackError(f"the MLflow server refused to grant {PIPELINE!r} MANAGE on the {kind} {resource!r} "
                             f"(HTTP {status}); its log: {stack.log('mlflow')}.")


def write_user_files(stack: Stack) -> None:
    """``<root>/env.<user>.sh`` for the reader and the admin (mode 600), beside env.sh (the pipeline's)."""
    for user in (READER, ADMIN):
        lines = [f"export MLFLOW_TRACKING_URI={stack.urls()['MLflow']}", f"export MLFLOW_TRACKING_USERNAME={user}",
                 f"export MLFLOW_TRACKING_PASSWORD={stack.secrets[user]}"]
        write_private(stack.root / f"env.{user}.sh", "\n".join(lines) + "\n")
