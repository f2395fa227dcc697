"""Register, promote through the gate, roll back: against a real `mlflow server` on 127.0.0.1
(SQLite backend, temporary artifact root), with real models scored on real images.

The test split has 3 hot dogs and 1 other image, so a model that always says "hotdog" scores
0.75 and one that never does scores 0.25: which model is better is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from models import params, project_with_data, save_variant

from finetune.demo.workspace import write_params
from finetune.model.classifier import read_final
from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.tracking.registry import (
    CANDIDATE,
    PRODUCTION,
    RegistryError,
    promote,
    promotion_log,
    register_candidate,
    rollback,
)

pytestmark = pytest.mark.slow
HOTDOG, OTHER = 0, 1  # the class a biased model always predicts


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"clf-{tmp_path.name}"  # one registered model per test on the shared server
    return project_with_data(tmp_path / "p", {"hotdog": 3, "not-hotdog": 1}, **{"register.model_name": name})


def train_and_register(project, finetune: int, scratch: int, tag: str):
    """Stand-ins for one pipeline run: two models, the evaluate stage, the register stage."""
    save_variant(project, "finetune", finetune, f"{tag}-ft")
    save_variant(project, "scratch", scratch, f"{tag}-sc")
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    return register_candidate(params(project), project / "models", project)


def aliases(project) -> dict[str, str]:
    model = MlflowClient().get_registered_model(params(project).register_.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_register_tags_the_winner_and_sets_candidate(project):
    registration = train_and_register(project, finetune=OTHER, scratch=HOTDOG, tag="a")
    assert registration.variant == "scratch" and registration.value == 0.75  # the winner, not the challenger
    client = MlflowClient()
    version = client.get_model_version(registration.model_name, registration.version)
    assert version.run_id == registration.run_id
    assert version.tags["variant"] == "scratch" and version.tags["run_id"] == registration.run_id
    assert version.tags["test.accuracy"] == "0.75" and version.tags["fingerprint"] == "a-sc"
    assert {"data_version", "git_commit", "params_digest"} <= set(version.tags)
    assert aliases(project) == {CANDIDATE: registration.version}
    record = json.loads((project / params(project).register_.record).read_text())
    assert record["version"] == registration.version
    # The registered model carries its config: params.yaml and the checkpoint with its settings.
    (project / "downloaded").mkdir()
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{registration.model_name}/{registration.version}",
                                                      dst_path=str(project / "downloaded")))
    assert (folder / "artifacts" / "params.yaml").read_text() == (project / "params.yaml").read_text()
    assert read_final(folder / "artifacts" / "model.pt")["settings"]["variant"] == "scratch"
    # Registering the same training again finds the version instead of adding one.
    again = register_candidate(params(project), project / "models", project)
    assert again.reused and again.version == registration.version


def test_the_gate_promotes_better_refuses_worse_and_equal_and_rollback_restores(project, capsys):
    first = train_and_register(project, OTHER, OTHER, "v1")  # accuracy 0.25
    decision = promote(params(project), project)
    assert decision.action == "promoted" and decision.reason == "no production version yet"
    assert aliases(project)[PRODUCTION] == first.version
    assert promote(params(project), project).action == "unchanged"  # the gate again, nothing new
    kept = MlflowClient().get_model_version(first.model_name, first.version).tags
    assert kept["promotion.decision"] == "promoted" and kept["promotion.reason"] == "no production version yet"

    write_params(project / "params.yaml", project / "params.yaml", {"register.min_improvement": 0.6})
    second = train_and_register(project, HOTDOG, OTHER, "v2")  # 0.75: better by 0.5, not by 0.6
    refused = promote(params(project), project)
    assert refused.action == "refused" and aliases(project)[PRODUCTION] == first.version
    assert (refused.candidate_score, refused.production_score) == (0.75, 0.25)
    assert "0.7500" in refused.reason and "0.2500" in refused.reason and ">= 0.6" in refused.reason

    write_params(project / "params.yaml", project / "params.yaml", {"register.min_improvement": 0.1})
    promoted = promote(params(project), project)
    assert promoted.action == "promoted" and aliases(project)[PRODUCTION] == second.version

    worse = train_and_register(project, OTHER, OTHER, "v3")
    assert promote(params(project), project).action == "refused"
    equal = train_and_register(project, HOTDOG, HOTDOG, "v4")  # 0.75 again: equal is not better
    tie = promote(params(project), project)
    assert tie.action == "refused" and "gain +0.0000" in tie.reason
    assert aliases(project) == {PRODUCTION: second.version, CANDIDATE: equal.version}

    client = MlflowClient()
    name = first.model_name
    versions = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions, key=int) == [first.version, second.version, worse.version, equal.version]
    assert versions[worse.version].tags["promotion.decision"] == "refused"
    assert versions[second.version].tags["promotion.decision"] == "promoted"
    assert "kept against" in versions[second.version].tags["promotion.last_challenge"]

    back = rollback(params(project), project)
    assert (back.production_before, back.production_after) == (second.version, first.version)
    assert aliases(project)[PRODUCTION] == first.version
    with pytest.raises(RegistryError, match="no earlier production version"):
        rollback(params(project), project)

    log = promotion_log(params(project), project)
    assert [entry["action"] for entry in log] == ["promoted", "unchanged", "refused", "promoted", "refused",
                                                  "refused", "rolled_back"]
    assert log[2]["candidate_score"] == 0.75 and log[2]["production_score"] == 0.25


def test_promote_without_a_candidate_says_what_to_run(project):
    save_variant(project, "finetune", HOTDOG, "x")  # creates the experiment, nothing registered
    with pytest.raises(Exception, match="register"):
        promote(params(project), project)


def test_promote_and_rollback_commands(project):
    import subprocess
    import sys

    train_and_register(project, OTHER, OTHER, "c1")
    run = lambda *args: subprocess.run([sys.executable, "-m", "finetune", *args], cwd=project,
                                       capture_output=True, text=True, timeout=300)
    first = run("promote")
    assert first.returncode == 0 and "promoted" in first.stdout, first.stderr
    train_and_register(project, OTHER, OTHER, "c2")
    second = run("promote")
    assert second.returncode == 0 and second.stdout.startswith("refused:"), second.stderr
    assert "0.2500 (candidate v2) vs 0.2500 (production v1)" in second.stdout
    third = run("rollback")
    assert third.returncode == 1 and "no earlier production version" in third.stderr


def test_an_unreachable_tracking_server_is_a_plain_error(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, free_port

    from finetune.demo.workspace import stage_env

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = stage_env() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = subprocess.run([sys.executable, "-m", "finetune", "promote"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: MLflow (http://127.0.0.1:") and "Traceback" not in result.stderr
