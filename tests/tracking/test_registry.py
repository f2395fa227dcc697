"""Register, promote through the gate, roll back: against a real `mlflow server` on 127.0.0.1
(SQLite backend, temporary artifact root), with real models scored on real images.

The test split has 10 red hot dogs (one medium red, one faint) and 10 blue other images, so the
colour networks score exactly 1.0, 0.95 and 0.9 (PERFECT, MISSES_FAINT, MISSES_TWO: which
model is better is known), and a network that always gives one class scores 0.5, chance: the
exact binomial p of 10 or more right of 20 at 0.5 is 0.588, far above evaluate.chance_p.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from models import (
    BLUE,
    MISSES_FAINT,
    MISSES_TWO,
    PERFECT,
    RED,
    coloured_jpeg,
    params,
    project_with_data,
    save_variant,
)

from finetune.demo.workspace import write_params
from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.stages.register import registered_words
from finetune.tracking.registry import (
    CANDIDATE,
    NETWORK_TAG,
    PRODUCTION,
    RegistryError,
    promote,
    promotion_log,
    register_candidate,
    registered_versions,
    rollback,
)
from finetune.tracking.serving import load_served, served_classifier

pytestmark = pytest.mark.slow
HOTDOG, OTHER = 0, 1  # the class a biased model always predicts


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"clf-{tmp_path.name}"  # one registered model per test on the shared server
    return project_with_data(tmp_path / "p", {"hotdog": 10, "not-hotdog": 10}, coloured=True,
                             **{"register.model_name": name})


def train_and_register(project, finetune, scratch, tag: str, network: bool = False):
    """Stand-ins for one pipeline run: two models, the evaluate stage, the register stage."""
    save_variant(project, "finetune", finetune, f"{tag}-ft", network=network)
    save_variant(project, "scratch", scratch, f"{tag}-sc", network=network)
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    return register_candidate(params(project), project / "models", project)


def aliases(project) -> dict[str, str]:
    model = MlflowClient().get_registered_model(params(project).register_.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_register_tags_the_winner_and_sets_candidate(project):
    registration = train_and_register(project, finetune=OTHER, scratch=MISSES_FAINT, tag="a", network=True)
    assert registration.variant == "scratch" and registration.value == 0.9  # the winner, not the challenger
    client = MlflowClient()
    version = client.get_model_version(registration.model_name, registration.version)
    assert version.run_id == registration.run_id
    assert version.tags["variant"] == "scratch" and version.tags["run_id"] == registration.run_id
    assert version.tags["test.accuracy"] == "0.95" and version.tags["fingerprint"] == "a-sc"
    assert {"data_version", "git_commit", "params_digest"} <= set(version.tags)
    assert aliases(project) == {CANDIDATE: registration.version}
    record = json.loads((project / params(project).register_.record).read_text())
    assert record["version"] == registration.version and record["registered"] is True
    assert record["chance"]["scratch"]["above_chance"] and not record["chance"]["finetune"]["above_chance"]
    # The registered model carries its config: params.yaml and the checkpoint with its settings.
    (project / "downloaded").mkdir()
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{registration.model_name}/{registration.version}",
                                                      dst_path=str(project / "downloaded")))
    assert (folder / "artifacts" / "params.yaml").read_text() == (project / "params.yaml").read_text()
    assert json.loads((folder / "artifacts" / "model.json").read_text())["settings"]["variant"] == "scratch"
    # The version is the classifier the training run logged (its weights stored once in the run),
    # and the same network as MLflow's pytorch flavour, by the tag or the version: a torch module.
    experiment = client.get_run(version.run_id).info.experiment_id
    logged = mlflow.search_logged_models([experiment], f"source_run_id = '{version.run_id}'", output_format="list")
    assert [m.name for m in logged] == ["classifier"] and version.tags[NETWORK_TAG] == f"models:/{logged[0].model_id}"
    assert version.source == f"models:/{logged[0].model_id}"
    network = mlflow.pytorch.load_model(f"models:/{registration.model_name}/{registration.version}")
    served = served_classifier(load_served(f"models:/{registration.model_name}/{registration.version}", project))
    batch = torch.rand(2, 3, 16, 16)
    assert torch.allclose(network.eval()(batch), served.model(batch), atol=1e-6)
    # Its description is the model card: origin, what differs from train_defaults, validation
    # and test accuracy with their uncertainty, why it was chosen.
    card = version.description
    assert card.startswith(f"**scratch** from run `{registration.run_id}` · data `{version.tags['data_version']}`")
    assert f"commit `{version.tags['git_commit']}`" in card and "Settings that differ from train_defaults: " in card
    assert "| validation | 0.9000 (uncertainty not recorded) |" in card and "| test | 0.9500 (95% interval 0." in card
    assert f"Chosen: {registration.reason}." in card and "Gate" not in card
    # Registering the same training again finds the version instead of adding one.
    again = register_candidate(params(project), project / "models", project)
    assert again.reused and again.version == registration.version


def test_the_gate_promotes_better_refuses_worse_and_equal_and_rollback_restores(project, capsys):
    first = train_and_register(project, MISSES_TWO, MISSES_TWO, "v1")  # accuracy 0.9
    decision = promote(params(project), project)
    assert decision.action == "promoted" and decision.reason == "no production version yet"
    assert aliases(project)[PRODUCTION] == first.version
    assert promote(params(project), project).action == "unchanged"  # the gate again, nothing new
    judged = MlflowClient().get_model_version(first.model_name, first.version)
    kept = judged.tags
    assert kept["promotion.decision"] == "promoted" and kept["promotion.reason"] == "no production version yet"
    # The card ends with the gate's decision (no study ran: no study line).
    assert judged.description.endswith(f"production none → v{first.version}: no production version yet")
    assert "\n\n**Gate:** promoted " in judged.description and "**Study:**" not in judged.description

    write_params(project / "params.yaml", project / "params.yaml", {"register.min_improvement": 0.15})
    second = train_and_register(project, PERFECT, OTHER, "v2")  # 1.0: better by 0.1, not by 0.15
    refused = promote(params(project), project)
    assert refused.action == "refused" and aliases(project)[PRODUCTION] == first.version
    assert (refused.candidate_score, refused.production_score) == (1.0, 0.9)
    assert "1.0000" in refused.reason and "0.9000" in refused.reason and ">= 0.15" in refused.reason

    write_params(project / "params.yaml", project / "params.yaml", {"register.min_improvement": 0.05})
    promoted = promote(params(project), project)
    assert promoted.action == "promoted" and aliases(project)[PRODUCTION] == second.version

    worse = train_and_register(project, MISSES_TWO, MISSES_TWO, "v3")
    assert promote(params(project), project).action == "refused"
    equal = train_and_register(project, PERFECT, PERFECT, "v4")  # 1.0 again: equal is not better
    tie = promote(params(project), project)
    assert tie.action == "refused" and "gain +0.0000" in tie.reason
    assert aliases(project) == {PRODUCTION: second.version, CANDIDATE: equal.version}
    # A second decision on a version replaces the card's gate line; other versions keep theirs.
    card = MlflowClient().get_model_version(first.model_name, second.version).description
    assert card.count("**Gate:**") == 1 and f"promoted {promoted.time}: production v{first.version} → " in card

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
    assert log[2]["candidate_score"] == 1.0 and log[2]["production_score"] == 0.9


def test_promote_without_a_candidate_says_what_to_run(project):
    """With nothing registered, promote raises RegistryError naming the model, the missing
    alias and the command that makes a candidate (`dvc repro register`), and moves nothing."""
    save_variant(project, "finetune", PERFECT, "x")  # creates the experiment, nothing registered
    name = params(project).register_.model_name
    with pytest.raises(RegistryError) as raised:
        promote(params(project), project)
    assert str(raised.value) == (f"{name} has no version with the alias 'candidate': run the register stage first "
                                 "(`dvc repro register`).")
    assert promotion_log(params(project), project) == []  # no decision recorded: there was nothing to judge


def test_promote_and_rollback_commands(project):
    import subprocess
    import sys

    train_and_register(project, MISSES_TWO, MISSES_TWO, "c1")
    run = lambda *args: subprocess.run([sys.executable, "-m", "finetune", *args], cwd=project,
                                       capture_output=True, text=True, timeout=300)
    first = run("promote")
    assert first.returncode == 0 and "promoted" in first.stdout, first.stderr
    train_and_register(project, MISSES_TWO, MISSES_TWO, "c2")
    second = run("promote")
    assert second.returncode == 0 and second.stdout.startswith("refused:"), second.stderr
    assert "0.9000 (candidate v2) vs 0.9000 (production v1)" in second.stdout
    third = run("rollback")
    assert third.returncode == 1 and "no earlier production version" in third.stderr


def test_concurrent_promotions_serialize(project):
    """Three `promote --force` started together (issue 23: two both printed v1 -> v2 and the
    history became ["1","2","2"]): one moves the alias, the others say unchanged, no duplicate."""
    import subprocess
    import sys

    train_and_register(project, MISSES_TWO, MISSES_TWO, "k1")
    assert promote(params(project), project).action == "promoted"
    train_and_register(project, PERFECT, PERFECT, "k2")
    processes = [subprocess.Popen([sys.executable, "-m", "finetune", "promote", "--force"], cwd=project,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    lines = sorted(out.splitlines()[0] for out, _ in outputs)
    print("\n".join(lines))
    name = params(project).register_.model_name
    assert [line.split(";")[0] for line in lines] == [f"promoted: {name} production v1 -> v2"] + [
        f"unchanged: {name} production v2 -> v2"] * 2
    model = MlflowClient().get_registered_model(name)
    assert json.loads(model.tags["production_history"]) == ["1", "2"] and aliases(project)[PRODUCTION] == "2"
    assert [d["action"] for d in promotion_log(params(project), project)] == ["promoted", "promoted", "unchanged",
                                                                               "unchanged"]


def command(project, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], cwd=project, capture_output=True, text=True, timeout=300)


# 10 or more right of 20 when each is right with probability 1/2: (2**20 + C(20, 10)) / 2 / 2**20.
P_TEN_OF_TWENTY = 616666 / 1048576


def test_a_model_at_chance_is_never_registered_and_the_record_says_why(project):
    first = train_and_register(project, PERFECT, OTHER, "good")
    assert first.variant == "finetune" and promote(params(project), project).action == "promoted"
    # The challenger validates best of all, but gives one class for every test image: chance.
    save_variant(project, "finetune", HOTDOG, "bad-ft", val_acc=0.99, val_loss=0.01)
    save_variant(project, "scratch", OTHER, "bad-sc")
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    document = json.loads((project / params(project).evaluate.metrics).read_text())
    assert document["finetune"]["chance_accuracy"] == 0.5 and not document["finetune"]["above_chance"]
    assert document["finetune"]["chance_p_value"] == pytest.approx(P_TEN_OF_TWENTY)

    stage = command(project, "finetune.stages.register", "--models", "models")
    assert stage.returncode == 0, stage.stderr  # an outcome, not a failure: the reports still follow
    assert stage.stdout.startswith("nothing registered: finetune did no better than chance (accuracy 0.500, chance "
                                   "0.500, binomial p = 0.59) and scratch did no better than chance"), stage.stdout
    record = json.loads((project / params(project).register_.record).read_text())
    assert record["registered"] is False and record["version"] is None and record["variant"] is None
    assert "nothing is registered" in record["reason"] and record["chance"]["scratch"]["above_chance"] is False
    # What was there stays: the earlier candidate and production, and no new version.
    assert aliases(project) == {CANDIDATE: first.version, PRODUCTION: first.version}
    assert registered_versions(MlflowClient(), first.model_name) == [first.version]

    # One compared variant at chance: the other is registered, whatever validation says.
    save_variant(project, "scratch", MISSES_FAINT, "ok-sc")
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    chosen = register_candidate(params(project), project / "models", project)
    assert chosen.registered and chosen.variant == "scratch" and chosen.version == str(int(first.version) + 1)
    assert "finetune did no better than chance (accuracy 0.500" in chosen.reason


def test_a_candidate_at_chance_is_never_promoted_forced_or_not_and_doctor_says_why(project):
    first = train_and_register(project, PERFECT, OTHER, "p1")
    assert promote(params(project), project).action == "promoted"
    second = train_and_register(project, MISSES_FAINT, OTHER, "p2")  # the candidate, 0.95 today
    # New test data: the other images turn red, so every colour network calls them hot dogs.
    for i in range(10):
        (project / "data" / "hotdog" / "test" / "not-hotdog" / f"{i:04d}.jpg").write_bytes(coloured_jpeg(RED, i))
    # v2 now gets the 9 redder hot dogs right and nothing else: 9 of 20, p = P(X >= 9) = 0.748.
    at_chance = "did no better than chance (accuracy 0.450, chance 0.500, binomial p = 0.75)"
    refused = promote(params(project), project)
    assert refused.action == "refused" and at_chance in refused.reason and "(9 of 20 right)" in refused.reason
    assert aliases(project)[PRODUCTION] == first.version
    forced = promote(params(project), project, force=True)
    assert forced.action == "refused" and "--force does not override this floor" in forced.reason
    assert aliases(project)[PRODUCTION] == first.version

    doctor = command(project, "finetune", "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr  # production at chance fails the check
    assert (f"@production (v{first.version}) did no better than chance (accuracy 0.500, chance 0.500, binomial "
            "p = 0.59)") in doctor.stdout
    assert f"@candidate (v{second.version}) {at_chance}" in doctor.stdout and "never promotes it" in doctor.stdout

    # No production at all changes nothing: a model at chance is never the first production either.
    MlflowClient().delete_registered_model_alias(first.model_name, PRODUCTION)
    empty = promote(params(project), project, force=True)
    assert empty.action == "refused" and empty.production_after is None and PRODUCTION not in aliases(project)
    log = promotion_log(params(project), project)[-3:]
    assert [entry["action"] for entry in log] == ["refused"] * 3
    assert all(at_chance in entry["reason"] for entry in log)
    tags = MlflowClient().get_model_version(second.model_name, second.version).tags
    assert tags["promotion.decision"] == "refused" and at_chance in tags["promotion.reason"]

    # Once the test data is as before, v2 is above chance and judged on its accuracy as usual.
    for i in range(10):
        (project / "data" / "hotdog" / "test" / "not-hotdog" / f"{i:04d}.jpg").write_bytes(coloured_jpeg(BLUE, i))
    assert promote(params(project), project).reason == "no production version yet"


def test_a_validation_tie_goes_to_the_lower_loss_and_the_score_carries_its_uncertainty(project):
    save_variant(project, "finetune", MISSES_TWO, "t-ft", val_acc=0.9, val_loss=0.30, val_images=200)
    save_variant(project, "scratch", MISSES_FAINT, "t-sc", val_acc=0.9, val_loss=0.25, val_images=200)
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    tie = register_candidate(params(project), project / "models", project)
    assert tie.variant == "scratch" and "lower validation loss (0.2500" in tie.reason
    # The exact (Clopper-Pearson) 95% interval of 180 right of 200.
    assert tie.uncertainty["source"] == "validation" and tie.uncertainty["images"] == 200
    assert tie.uncertainty["ci95"] == pytest.approx([0.84979, 0.93784], abs=1e-5)
    record = json.loads((project / params(project).register_.record).read_text())
    assert record["uncertainty"] == tie.uncertainty and record["value"] == 0.9
    assert "val_acc 0.9000 (95% interval 0.8498–0.9378, 200 validation images)" in registered_words(tie, "r.json")

    save_variant(project, "scratch", MISSES_FAINT, "cv-sc", val_acc=0.92, val_loss=0.2, val_source="cross-validation",
                 val_acc_sd=0.02, val_folds=5)
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    folds = register_candidate(params(project), project / "models", project)
    assert folds.uncertainty == {"source": "cross-validation", "folds": 5, "sd": 0.02}
    assert "val_acc 0.9200 ± 0.0200 (sd over 5 folds)" in registered_words(folds, "r.json")


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
