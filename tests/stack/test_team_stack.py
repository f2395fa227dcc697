"""The shared stack as a team runs it (stack/, `make stack`): real PostgreSQL, a real S3 server
(s3rver, objects on disk), `mlflow server` on both, `prefect server` on PostgreSQL and a process worker, all on
127.0.0.1. The scheduled deployment runs on the worker into the tracking server and the bucket,
`dvc push`/`dvc pull` move the data and models between two clones; then the stack's failures:
PostgreSQL restarted, the worker killed mid-run, the tracking server stopped mid-training; and a
two-"node" torchrun that trains one model into one MLflow run.

One stack for the module (it takes a minute or two to start); the tests run in file order and
the later ones build on the first run.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import REPO, TINY_DATA, dataset_zip, free_port, jpeg, sha
from mlflow.tracking import MlflowClient
from tracking.test_outage import EPOCHS, SLOW_EPOCHS, epochs_done, steps, train_command
from train.test_distributed import separable_project
from train.test_training import make_project

from finetune.core.env import PIPELINE_RUN
from finetune.demo.workspace import stage_env, sync_workspace, write_params
from flows.lock import LOCK_FILE
from stack.lifecycle import purge, start_mlflow, start_worker, up
from stack.services import BUCKET, PIPELINE, Ports, Stack

pytestmark = [pytest.mark.stack, pytest.mark.slow]
DEPLOYMENT = "finetune-retrain/scheduled-retrain"
MODEL = "hotdog-classifier"
# 16-pixel crops (TINY_DATA's) leave ResNet's last stage one pixel wide: one step of training
# can blow up its batch statistics, and evaluation then scores NaN probabilities.
# With them, the stack's trainings also hold out validation (2 of each class's 3 train images).
CROPS = {"model.train_crop": 64, "model.test_resize": 64, "model.test_crop": 64,
         "train_defaults.val_fraction": 0.5, "train_defaults.select": "best"}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """The dataset's archive, served from a file (no network)."""
    path = tmp_path_factory.mktemp("mirror") / "hotdog.zip"
    path.write_bytes(dataset_zip())
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory, mirror):
    """A workspace (git + DVC copy of the project) and the stack whose worker runs flows in it."""
    base = tmp_path_factory.mktemp("team")
    workspace = sync_workspace(REPO, base / "ws", {"data.url": mirror.as_uri(), "data.checksum": sha(mirror.read_bytes()),
                                                   **TINY_DATA, **CROPS}, share_cache=False)
    stack = Stack(base / "stack", workspace, Ports(free_port(), free_port(), free_port(), free_port()))
    seconds = up(stack)
    print(f"stack up in {seconds:.0f} s")
    env = stage_env() | stack.client_env() | {"PREFECT_HOME": str(stack.root / "prefect"),
                                               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    dvc(workspace, env, "remote", "modify", "--local", "shared", "endpointurl", stack.urls()["S3"])
    # This process's MlflowClient and the stage processes it starts sign in as the pipeline user.
    signed_in = stack.user_env(PIPELINE)
    os.environ.update(signed_in)
    yield stack, workspace, env
    for name in signed_in:
        os.environ.pop(name, None)
    purge(stack)  # PostgreSQL's data may live outside tmp (as root: /var/tmp)


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=cwd,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def trigger(env: dict[str, str], watch: bool = True) -> subprocess.CompletedProcess[str]:
    """`prefect deployment run` (with --watch: until the flow run ends)."""
    return subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT, *(["--watch"] if watch else [])],
                          env=env, capture_output=True, text=True, timeout=900)


def flow_runs(env: dict[str, str]) -> list[dict]:
    """The deployment's flow runs, oldest first: id, state, work pool."""
    script = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=100, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
        print(json.dumps([{"id": str(r.id), "state": r.state_type.value, "pool": r.work_pool_name,
                           "deployment": str(r.deployment_id), "message": r.state.message if r.state else ""}
                          for r in runs if r.deployment_id]))
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [run for run in json.loads(done.stdout) if run["state"] != "SCHEDULED"]  # not the cron's coming runs


def bucket_keys(stack: Stack, prefix: str) -> list[str]:
    env = stack.s3_env()
    client = boto3.client("s3", endpoint_url=stack.urls()["S3"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def training_runs(client: MlflowClient) -> list:
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get("variant")]


def test_the_worker_runs_the_deployment_into_the_tracking_server_and_the_bucket(team):
    stack, workspace, env = team
    # `make deploy`, the project's own recipe, against the stack (the workspace has no .venv of its own).
    venv = Path(sys.executable).parent.parent
    deployed = subprocess.run(["make", "-C", str(workspace), "deploy", f"VENV={venv}", "-o", f"{venv}/.installed"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    done = trigger(env)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = flow_runs(env)
    assert [(r["state"], r["pool"]) for r in runs] == [("COMPLETED", "finetune-process")], runs
    # Executed by the worker: it logged that it picked the run up.
    assert runs[0]["id"] in stack.log("worker").read_text()

    client = MlflowClient(stack.urls()["MLflow"])
    trained = training_runs(client)
    assert sorted(r.data.tags["variant"] for r in trained) == ["finetune", "scratch"]
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in trained)  # served by the server
    keys = bucket_keys(stack, "mlflow/")
    for run in trained:
        assert any(f"/{run.info.run_id}/artifacts/" in key for key in keys), (run.info.run_id, keys[:20])
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.version for v in versions) == ["1"]
    assert client.get_model_version_by_alias(MODEL, "production").version == "1"
    print(f"flow run {runs[0]['id']} {runs[0]['state']}; MLflow runs {[r.info.run_id for r in trained]}; "
          f"{len(keys)} keys under mlflow/, e.g. {keys[:3]}")


def test_dvc_push_and_a_second_clone_pulls_the_same_data_models_and_runs(team, tmp_path):
    stack, workspace, env = team
    git(workspace, "add", "-A")
    git(workspace, "commit", "-q", "-m", "the first scheduled run")  # what a team pushes to its git server
    dvc(workspace, env, "push", "-r", "shared")
    keys = bucket_keys(stack, "dvc/")
    assert any(key.startswith("dvc/files/md5/") for key in keys), keys[:10]

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(workspace), str(clone))
    assert not (clone / "models" / "finetune" / "model.pt").exists()
    dvc(clone, env, "remote", "modify", "--local", "shared", "endpointurl", stack.urls()["S3"])
    dvc(clone, env, "pull", "-r", "shared")
    for path in ("models/finetune/model.pt", "models/scratch/model.pt", "data/hotdog"):
        assert (clone / path).exists(), path
    assert (clone / "models/finetune/model.pt").read_bytes() == (workspace / "models/finetune/model.pt").read_bytes()
    # The same runs and versions on the shared server, from the other clone.
    run_id = json.loads((clone / "models" / "finetune" / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(stack.urls()["MLflow"])
    assert client.get_run(run_id).data.tags["variant"] == "finetune"
    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg((200, 60, 40), (16, 16)))
    predicted = subprocess.run([sys.executable, "-m", "finetune", "predict", str(image)], cwd=clone, env=env,
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["class"] in ("hotdog", "not-hotdog") and answer["file"].endswith("red.jpg")
    assert not (clone / "mlflow" / "mlflow.db").exists()  # the production model came from the shared registry
    print(f"dvc push: {len(keys)} keys under dvc/; the clone pulled model.pt; predict: {predicted.stdout.strip()[:200]}")


def test_a_postgresql_restart_between_two_flow_runs_costs_nothing(team):
    stack, workspace, env = team
    pid_before = (stack.postgres.data / "postmaster.pid").read_text().split()[0]
    stack.postgres.restart()
    assert (stack.postgres.data / "postmaster.pid").read_text().split()[0] != pid_before
    done = trigger(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["state"] for r in flow_runs(env)] == ["COMPLETED", "COMPLETED"]
    assert sorted(v.version for v in MlflowClient(stack.urls()["MLflow"]).search_model_versions(f"name = '{MODEL}'")) == ["1"]


def lock_is_free(workspace: Path) -> bool:
    with (workspace / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


def test_a_killed_worker_leaves_a_crashed_run_and_the_next_trigger_completes(team, mirror):
    stack, workspace, env = team
    # New data: the run fetches, validates and trains again, long enough to be killed in.
    mirror.write_bytes(dataset_zip(variant=1))
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"data.checksum": sha(mirror.read_bytes())})
    assert trigger(env, watch=False).returncode == 0
    wait_for(lambda: any(r["state"] == "RUNNING" for r in flow_runs(env)) and not lock_is_free(workspace), 300,
             "the flow run took the workspace lock")
    stack.kill("worker", signal.SIGKILL)  # the worker's machine dies: the worker and its flow run
    killed = time.monotonic()
    # A lock held by a dead process is no lock: free as soon as the kernel has torn the killed
    # processes down (the stage's trainer follows its starter within seconds).
    wait_for(lambda: lock_is_free(workspace), 30, "the killed run's workspace lock was released")
    # The automation fires after 90 s without heartbeats; on a loaded 2-core machine the server
    # evaluates it later (one CI run saw more than 240 s), hence the margin.
    wait_for(lambda: any(r["state"] == "CRASHED" for r in flow_runs(env)), 480,
             "the orphaned flow run was marked crashed")
    crashed = next(r for r in flow_runs(env) if r["state"] == "CRASHED")
    print(f"flow run {crashed['id']} CRASHED {time.monotonic() - killed:.0f} s after the kill: {crashed['message']}")

    start_worker(stack)  # a new worker (another machine) on the same pool
    done = trigger(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["state"] for r in flow_runs(env)] == ["COMPLETED", "COMPLETED", "CRASHED", "COMPLETED"]
    status = dvc(workspace, env, "status", "--json")
    assert json.loads(status) == {}
    assert sorted(v.version for v in MlflowClient(stack.urls()["MLflow"]).search_model_versions(f"name = '{MODEL}'")) == ["1", "2"]


def test_the_tracking_server_stopped_mid_training_costs_no_epoch_and_the_rerun_resumes_its_run(team, tmp_path):
    stack = team[0]
    uri = stack.urls()["MLflow"]
    project = make_project(tmp_path / "project", **SLOW_EPOCHS)
    out = project / "models" / "finetune"
    training = train_command(project, uri)
    wait_for(lambda: epochs_done(out) >= 1 or training.poll() is not None, 300, "the first epoch")
    stack.kill("mlflow", signal.SIGKILL)  # the server and its workers, mid-training
    stdout, stderr = training.communicate(timeout=300)
    assert training.returncode == 1, stdout + stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: the MLflow tracking server {uri}"), stderr
    assert epochs_done(out) == EPOCHS and (out / "model.pt").exists()  # every epoch trained and kept
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] is False
    print(f"tracking server stopped: the stage exited {training.returncode}: {error}")

    start_mlflow(stack)  # the same port, database and bucket
    rerun = train_command(project, uri)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stdout + stderr
    assert json.loads((out / "run.json").read_text()) == record | {"complete": True}  # the same MLflow run
    client = MlflowClient(uri)
    assert steps(client, record["mlflow_run_id"], "val_acc") == list(range(1, EPOCHS + 1))
    assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"
    assert any(f"/{record['mlflow_run_id']}/artifacts/" in key for key in bucket_keys(stack, "mlflow/"))


def test_two_nodes_under_torchrun_train_one_model_into_one_run(team, tmp_path):
    stack = team[0]
    client = MlflowClient(stack.urls()["MLflow"])
    before = {run.info.run_id for run in training_runs(client)}
    nodes = [separable_project(tmp_path / f"node{rank}", 1) for rank in range(2)]  # two machines, same data
    # No shared folder: each node's first process builds that node's decode cache.
    env = stage_env() | stack.user_env(PIPELINE) | {"MLFLOW_TRACKING_URI": stack.urls()["MLflow"],
                                                    "GLOO_SOCKET_IFNAME": "lo"}
    env.pop(PIPELINE_RUN, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes",
               "--local-addr", "127.0.0.1", "-m", "finetune.stages.train", "finetune", "--out", "models/finetune",
               "--metrics", "metrics/finetune.json", "--plots", "plots/finetune.csv"]
    launchers = [subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for node in nodes]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    new = [run for run in training_runs(client) if run.info.run_id not in before]
    assert len(new) == 1 and new[0].data.tags["processes"] == "2", [r.data.tags for r in new]
    models = [node for node in nodes if (node / "models" / "finetune" / "model.pt").exists()]
    assert len(models) == 1, "rank 0 alone writes the model"
    record = json.loads((models[0] / "models" / "finetune" / "run.json").read_text())
    assert record["mlflow_run_id"] == new[0].info.run_id
    metrics = json.loads((models[0] / "metrics" / "finetune.json").read_text())
    assert metrics["train_images"] == 24  # both nodes' shares: every train image once per epoch
    print(f"two nodes: MLflow run {new[0].info.run_id}, val_acc {metrics['val_acc']}, model in {models[0].name}")
