"""The stack never forgets (issue 23, items 1 and 2), with real servers: a run with a model and a
multipart artifact logged through `mlflow server`, registered and promoted, and a DVC project
pushed to the remote `shared`. Then the object store is killed with SIGKILL and the whole stack
stopped and started again: the model loads and a fresh clone's `dvc pull` gets the same bytes.
Then `python -m stack backup` writes one archive and `python -m stack restore` fills a fresh
stack folder (other ports, new secrets) with the same runs, versions, aliases, artifacts and
DVC objects. The tests run in file order and the later build on the first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port

from stack import objectstore
from stack.lifecycle import down, purge, start_s3, up
from stack.services import BUCKET, Ports, Stack

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MODEL = "durable-model"
BIG = 12 * 1024 * 1024  # over boto3's 8 MB threshold: a multipart upload, ranged downloads


def free_ports() -> Ports:
    return Ports(free_port(), free_port(), free_port(), free_port())


def run(cwd: Path, env: dict[str, str], *command: str) -> str:
    done = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run(cwd, env, sys.executable, "-m", "dvc", *args)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, dict(os.environ), "git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args)


def client_env(stack: Stack) -> dict[str, str]:
    env = dict(os.environ) | stack.client_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def prefect_auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(stack.prefect_auth().encode()).decode()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A child process per MLflow call: the client's tracking URI is process-wide state.
LOG_RUN = """
import json, os, sys, mlflow
from mlflow.tracking import MlflowClient
class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2
with mlflow.start_run() as run:
    mlflow.log_param("seed", 7)
    mlflow.log_metric("val_acc", 0.75)
    mlflow.log_artifact(sys.argv[1])
    mlflow.pyfunc.log_model(name="model", python_model=Doubler(), registered_model_name=sys.argv[2])
client = MlflowClient()
version = client.search_model_versions(f"name = '{sys.argv[2]}'")[0].version
client.set_registered_model_alias(sys.argv[2], "production", version)
print(json.dumps({"run_id": run.info.run_id, "version": version}))
"""

READ_BACK = """
import hashlib, json, sys, tempfile, mlflow, pandas as pd
from mlflow.tracking import MlflowClient
client = MlflowClient()
name, run_id = sys.argv[1], sys.argv[2]
production = client.get_model_version_by_alias(name, "production")
model = mlflow.pyfunc.load_model(f"models:/{name}@production")
path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="big.bin", dst_path=tempfile.mkdtemp())
run = client.get_run(run_id)
print(json.dumps({"version": production.version, "run_of_version": production.run_id,
                  "prediction": model.predict(pd.DataFrame({"x": [21]}))["x"].tolist(),
                  "big": hashlib.sha256(open(path, "rb").read()).hexdigest(),
                  "params": run.data.params, "metrics": run.data.metrics,
                  "runs": sorted(r.info.run_id for r in client.search_runs(["0"]))}))
"""


def read_back(stack: Stack, run_id: str) -> dict:
    return json.loads(run(REPO, client_env(stack), sys.executable, "-c", READ_BACK, MODEL, run_id).strip().splitlines()[-1])


def pull_fresh_clone(stack: Stack, origin: Path, clone: Path) -> dict[str, str]:
    """`git clone` of the DVC project, `dvc pull -r shared` from ``stack``: the pulled files' digests."""
    git(origin.parent, "clone", "-q", str(origin), str(clone))
    env = client_env(stack)
    dvc(clone, env, "remote", "modify", "--local", "shared", "endpointurl", stack.urls()["S3"])
    dvc(clone, env, "pull", "-r", "shared")
    return {str(p.relative_to(clone)): digest(p) for p in sorted((clone / "data").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def durable(tmp_path_factory):
    """A stack, a run with a model (version 1 at production) and a pushed DVC project."""
    base = tmp_path_factory.mktemp("durable")
    stack = Stack(base / "stack", base, free_ports())  # the worker runs no flow here
    try:  # a setup that fails after the start still stops the stack
        print(f"stack up in {up(stack):.0f} s")
        env = client_env(stack)
        big = base / "big.bin"
        big.write_bytes(os.urandom(BIG))
        logged = json.loads(run(base, env, sys.executable, "-c", LOG_RUN, str(big), MODEL).strip().splitlines()[-1])
        project = base / "project"
        (project / "data" / "images").mkdir(parents=True)
        (project / "data" / "table.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        for index in range(5):
            (project / "data" / "images" / f"{index}.bin").write_bytes(os.urandom(1000 + index))
        git(project, "init", "-q")
        dvc(project, env, "init", "-q")
        dvc(project, env, "remote", "add", "shared", f"s3://{BUCKET}/dvc")
        dvc(project, env, "remote", "modify", "shared", "endpointurl", stack.urls()["S3"])
        dvc(project, env, "add", "data/table.bin", "data/images")
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "data")
        dvc(project, env, "push", "-r", "shared")
        expected = {str(p.relative_to(project)): digest(p) for p in sorted((project / "data").rglob("*"))
                    if p.is_file() and p.name != ".gitignore" and p.suffix != ".dvc"}
        yield stack, base, logged, digest(big), project, expected
    finally:
        purge(stack)


def test_a_kill_9_and_a_restart_of_the_stack_keep_every_artifact_and_dvc_object(durable):
    stack, base, logged, big, project, expected = durable
    before = read_back(stack, logged["run_id"])
    objects = objectstore.count(stack.objects)
    assert objects[0] > 10 and before["big"] == big and before["prediction"] == [42]

    # Listed page by page (continuation tokens), as DVC lists a remote of thousands of objects.
    pages = stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, MaxKeys=2)
    assert sum(len(page.get("Contents", [])) for page in pages) == objects[0]

    stack.kill("s3", signal.SIGKILL)  # the object store dies mid-flight
    start_s3(stack)
    assert objectstore.count(stack.objects) == objects
    started = time.monotonic()
    down(stack)  # make stack-down
    seconds = up(stack)  # make stack
    after = read_back(stack, logged["run_id"])
    assert after == before
    assert after["version"] == logged["version"] and after["run_of_version"] == logged["run_id"]
    pulled = pull_fresh_clone(stack, project, base / "clone-after-restart")
    assert {name: value for name, value in pulled.items() if name in expected} == expected
    print(f"kill -9 of the object store and a stack restart ({time.monotonic() - started:.0f} s, up in {seconds:.0f} s): "
          f"{objects[0]} objects ({objects[1] / 1e6:.1f} MB) kept; production v{after['version']} loads and predicts "
          f"{after['prediction']}; big.bin identical; the clone pulled {len(expected)} identical files")


def test_a_backup_restores_into_a_fresh_stack_folder_with_the_same_runs_models_and_data(durable):
    stack, base, logged, big, project, expected = durable
    request = urllib.request.Request(f"{stack.urls()['Prefect']}/api/variables/", method="POST",
                                     data=json.dumps({"name": "backup_probe", "value": "kept"}).encode(),
                                     headers={"Content-Type": "application/json", **prefect_auth(stack)})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201
    before = read_back(stack, logged["run_id"])
    archive = base / "backups" / "stack.tar.gz"
    started = time.monotonic()
    run(REPO, dict(os.environ), sys.executable, "-m", "stack", "backup", "--root", str(stack.root), "--file", str(archive))
    backup_s = time.monotonic() - started
    assert archive.stat().st_mode & 0o777 == 0o600

    restored_root = base / "restored"
    ports = free_ports()
    started = time.monotonic()
    run(REPO, dict(os.environ), sys.executable, "-m", "stack", "restore", "--root", str(restored_root), "--project", str(base), "--file",
        str(archive), *[f"--port={name}={port}" for name, port in (("UI", ports.mlflow), ("PREFECT", ports.prefect),
                                                                     ("S3", ports.s3), ("POSTGRES", ports.postgres))])
    restore_s = time.monotonic() - started
    restored = Stack(restored_root, base)
    try:
        assert restored.ports == ports and restored.s3_key != stack.s3_key  # its own ports and secrets
        assert read_back(restored, logged["run_id"]) == before
        probe = urllib.request.Request(f"{restored.urls()['Prefect']}/api/variables/name/backup_probe",
                                       headers=prefect_auth(restored))
        with urllib.request.urlopen(probe, timeout=30) as answer:
            assert json.load(answer)["value"] == "kept"
        pulled = pull_fresh_clone(restored, project, base / "clone-after-restore")
        assert {name: value for name, value in pulled.items() if name in expected} == expected
        assert objectstore.count(restored.objects) == objectstore.count(stack.objects)
    finally:
        purge(restored)
    print(f"backup: {archive.stat().st_size / 1e6:.1f} MB in {backup_s:.1f} s; restore into a fresh folder and start: "
          f"{restore_s:.0f} s; runs {len(before['runs'])}, production v{before['version']}, big.bin and "
          f"{len(expected)} DVC files identical, the Prefect variable kept")


def status_of(url: str, method: str = "GET", body: dict | None = None, user: str | None = None,
              password: str | None = None, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of one request, with basic auth when ``user`` is given."""
    headers = dict(headers or {}) | {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def s3_status(stack: Stack, key: str, secret: str) -> int:
    """The status of a signed listing of the bucket with ``key`` and ``secret``."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=stack.urls()["S3"], region_name="us-east-1", aws_access_key_id=key,
                          aws_secret_access_key=secret)
    try:
        return client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)["ResponseMetadata"]["HTTPStatusCode"]
    except ClientError as err:
        return err.response["ResponseMetadata"]["HTTPStatusCode"]


def test_no_one_uninvited_anonymous_wrong_password_and_read_only_are_refused(durable):
    from stack.services import ADMIN, PIPELINE, READER

    stack, base, logged, *_ = durable
    mlflow, prefect, s3 = stack.urls()["MLflow"], stack.urls()["Prefect"], stack.urls()["S3"]
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
    alias = f"{mlflow}/api/2.0/mlflow/registered-models/alias"
    move = {"name": MODEL, "alias": "production", "version": logged["version"]}
    matrix = {
        "MLflow anonymous": status_of(search),
        "MLflow wrong password": status_of(search, user=PIPELINE, password="wrong"),
        "MLflow reader reads": status_of(search, user=READER, password=stack.secrets[READER]),
        "MLflow reader moves production": status_of(alias, "POST", move, READER, stack.secrets[READER]),
        "MLflow pipeline moves production": status_of(alias, "POST", move, PIPELINE, stack.secrets[PIPELINE]),
        "MLflow admin reads": status_of(search, user=ADMIN, password=stack.secrets[ADMIN]),
        "MLflow default admin password": status_of(search, user=ADMIN, password="password1234"),
        "Prefect anonymous": status_of(f"{prefect}/api/flows/filter", "POST", {}),
        "Prefect wrong auth string": status_of(f"{prefect}/api/flows/filter", "POST", {}, ADMIN, "wrong"),
        "Prefect auth string": status_of(f"{prefect}/api/flows/filter", "POST", {}, headers=prefect_auth(stack)),
        "S3 anonymous read": status_of(f"{s3}/{BUCKET}/dvc/"),
        "S3 anonymous write": status_of(f"{s3}/{BUCKET}/intruder.txt", "PUT", {"x": 1}),
        "S3 wrong secret key": s3_status(stack, stack.s3_key, "wrong"),
        "S3 the stack's keys": s3_status(stack, stack.s3_key, stack.s3_secret),
    }
    print("\n".join(f"  {name:<36} {code}" for name, code in matrix.items()))
    assert matrix == {"MLflow anonymous": 401, "MLflow wrong password": 401, "MLflow reader reads": 200,
                      "MLflow reader moves production": 403, "MLflow pipeline moves production": 200,
                      "MLflow admin reads": 200, "MLflow default admin password": 401, "Prefect anonymous": 401,
                      "Prefect wrong auth string": 401, "Prefect auth string": 200, "S3 anonymous read": 403,
                      "S3 anonymous write": 403, "S3 wrong secret key": 403, "S3 the stack's keys": 200}
    # The reader browses and loads models: the production model, as the reader.
    reader = dict(client_env(stack), MLFLOW_TRACKING_USERNAME=READER, MLFLOW_TRACKING_PASSWORD=stack.secrets[READER])
    loaded = run(REPO, reader, sys.executable, "-c", "import mlflow, pandas as pd; print(mlflow.pyfunc.load_model("
                 f"'models:/{MODEL}@production').predict(pd.DataFrame({{'x': [5]}}))['x'].tolist())")
    assert loaded.strip().splitlines()[-1] == "[10]"
    # Every secret is in files only its owner reads, and none is printed whole. (`make stack` on
    # the running stack starts nothing and writes the clients' files.)
    again = run(REPO, dict(os.environ), sys.executable, "-m", "stack", "up", "--root", str(stack.root),
                "--project", str(base))
    for name in ("stack.json", "env.sh", f"env.{READER}.sh", f"env.{ADMIN}.sh", "mlflow-auth.ini"):
        assert (stack.root / name).stat().st_mode & 0o777 == 0o600, name
    printed = run(REPO, dict(os.environ), sys.executable, "-m", "stack", "env", "--root", str(stack.root))
    for secret in (stack.s3_secret, stack.secrets[PIPELINE], stack.secrets["prefect"], stack.password):
        assert secret not in printed and secret not in again
