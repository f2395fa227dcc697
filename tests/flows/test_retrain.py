"""Scheduled retraining against a real `prefect server start` on 127.0.0.1: the deployment served
by `python -m flows.retrain`, triggered through the Prefect CLI; the whole chain runs through DVC
into a real MLflow store. Two triggers at once never train at the same time; a validation
failure fails the run and registers nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import REPO, TINY_DATA, dataset_zip, free_port, jpeg, make_zip, sha, stop_server
from mlflow.tracking import MlflowClient

from finetune.demo.workspace import stage_env, sync_workspace, write_params
from flows.server import start_server

pytestmark = pytest.mark.slow
DEPLOYMENT = "finetune-retrain/scheduled-retrain"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server (flows/server.py starts it as `make scheduler` does)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")  # schedule without a minute's wait
    server = start_server(home, port)
    patch.undo()
    yield f"http://127.0.0.1:{port}/api", home
    server.terminate()
    server.wait(timeout=30)


def test_the_prefect_ui_talks_to_the_port_its_server_runs_on(prefect_api):
    api, _ = prefect_api  # not 4200: free_port()
    with urllib.request.urlopen(api.removesuffix("/api") + "/ui-settings", timeout=10) as answer:
        assert json.load(answer)["api_url"] == api


def prefect(env, *args, timeout=600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def flow_runs(env) -> list[dict]:
    """Every flow run of the deployment: state, start and end (through the Prefect client)."""
    script = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=100, sort=FlowRunSort.START_TIME_ASC)
        print(json.dumps([{"name": r.name, "state": r.state_type.value, "start": r.start_time.timestamp() if r.start_time else None,
                           "end": r.end_time.timestamp() if r.end_time else None, "expected": r.expected_start_time.timestamp()} for r in runs]))
asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def artifacts(env, key: str) -> list[str]:
    """The Markdown of every version of the artifact ``key``, oldest first."""
    script = f"""
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort
async def main():
    async with get_client() as client:
        # (artifacts published by a task: the task-run filter joins on their task run)
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[{key!r}]) if {key!r} else None),
                                            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
                                            limit=100, sort=ArtifactSort.CREATED_DESC)
        print(json.dumps([a.data if {key!r} else [a.key, a.type, str(a.data)[:80]] for a in reversed(found)]))
asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def versions(workspace: Path) -> list[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}")
    return sorted(v.version for v in client.search_model_versions("name = 'hotdog-classifier'"))


def test_retrain_deployment_on_a_real_prefect_server(tmp_path, prefect_api):
    api, home = prefect_api
    mirror = tmp_path / "hotdog.zip"
    mirror.write_bytes(dataset_zip())
    workspace = sync_workspace(REPO, tmp_path / "ws", {"data.url": mirror.as_uri(), "data.checksum": sha(mirror.read_bytes()),
                                                      **TINY_DATA}, share_cache=False)
    env = stage_env() | {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--workspace", str(workspace)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while prefect(env, "deployment", "inspect", DEPLOYMENT).returncode != 0:
            assert served.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        inspected = prefect(env, "deployment", "inspect", DEPLOYMENT).stdout
        assert "0 3 * * 1" in inspected  # the cron of params.yaml
        # The server's scheduler fills in the coming runs: Mondays at 03:00 UTC.
        while not (scheduled := [r for r in flow_runs(env) if r["state"] == "SCHEDULED"]):
            assert time.monotonic() < deadline, "the Prefect scheduler made no runs"
            time.sleep(1)
        starts = [datetime.fromtimestamp(r["expected"], timezone.utc) for r in scheduled]
        assert all((t.weekday(), t.hour, t.minute) == (0, 3, 0) for t in starts), starts

        # Two triggers at once: both complete, one after the other.
        runs = [subprocess.Popen([sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT, "--watch"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
        outputs = [run.communicate(timeout=900)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        done = sorted((r for r in flow_runs(env) if r["state"] == "COMPLETED"), key=lambda r: r["start"])
        assert len(done) == 2 and done[0]["end"] <= done[1]["start"], done
        assert versions(workspace) == [1]  # the second run found nothing new: no second version
        reports = artifacts(env, "finetune-pipeline-report")
        assert len(reports) == 2, artifacts(env, None)
        assert "McNemar" in reports[0] and "**Promotion**: promoted" in reports[0]
        assert "**Promotion**: unchanged" in reports[1]
        # Link artifacts beside each report: the MLflow view of the pipeline run, and the version.
        runs_links, model_links = artifacts(env, "finetune-runs-link"), artifacts(env, "finetune-model-link")
        assert len(runs_links) == 2 and all("/runs?viewStateShareKey=pipeline-" in link for link in runs_links)
        assert len(model_links) == 2 and all("/#/models/hotdog-classifier/versions/1" in link for link in model_links)
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=workspace, env=env,
                                capture_output=True, text=True)
        assert status.stdout.strip() == "{}"

        # New data at the URL that fails validation (one image per class): the run fails, and
        # no new version appears.
        bad = make_zip({f"hotdog/{split}/{label}/0.jpg": jpeg((9, 9, 9)) for split in ("train", "test")
                        for label in ("hotdog", "not-hotdog")})
        mirror.write_bytes(bad)
        write_params(workspace / "params.yaml", workspace / "params.yaml", {"data.checksum": sha(bad)})
        failed = prefect(env, "deployment", "run", DEPLOYMENT, "--watch", timeout=900)
        assert failed.returncode != 0, failed.stdout
        assert any(r["state"] == "FAILED" for r in flow_runs(env))
        assert versions(workspace) == [1]
    finally:
        stop_server(served)
