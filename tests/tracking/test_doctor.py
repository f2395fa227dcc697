"""Production can always be repaired (issue 16): an unreadable production, a lost MLflow store,
rollback and `promote --version` from any state, and `python -m finetune doctor` naming each
mismatch with its repair (issue 23: damaged DVC cache objects, a missing production alias, an
unreadable production that is also the candidate, set-aside checkpoints). Real models, the
project's own SQLite store, real DVC, real subprocesses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from models import MISSES_TWO, PERFECT, params, project_with_data, save_variant

from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.tracking.cache_check import md5_of
from finetune.tracking.doctor import diagnose
from finetune.tracking.registry import PRODUCTION, RegistryError, promote, register_candidate, rollback
from finetune.tracking.store import use_store

pytestmark = pytest.mark.slow
HOTDOG, OTHER = 0, 1  # biased networks: at chance on the balanced test split
REGISTER = "dvc repro --force --single-item register"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own mlflow/mlflow.db
    # Coloured: the colour networks learned (PERFECT 1.0, MISSES_TWO 0.9), the biased ones did not.
    root = project_with_data(tmp_path / "p", {"hotdog": 10, "not-hotdog": 10}, coloured=True)
    monkeypatch.chdir(root)
    return root


def register(project: Path, finetune, scratch, tag: str):
    save_variant(project, "finetune", finetune, f"{tag}-ft")
    save_variant(project, "scratch", scratch, f"{tag}-sc")
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    return register_candidate(params(project), project / "models", project)


def cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, *(args if args[0] == "-c" else ("-m", *args))]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)


def corrupt(project: Path, version: str) -> None:
    """Overwrite the registered model's network in the artifact store."""
    use_store(project)
    client = MlflowClient()
    source = client.get_model_version(params(project).register_.model_name, version).source
    location = client.get_logged_model(source.split("/")[1]).artifact_location
    files = list(Path(location.removeprefix("file://")).rglob("model.pth"))
    assert files, location
    for file in files:
        file.write_bytes(b"not a checkpoint")


def production(project: Path) -> str:
    use_store(project)
    return str(MlflowClient().get_registered_model(params(project).register_.model_name).aliases[PRODUCTION])


def test_an_unreadable_production_is_replaced_and_doctor_says_how(project):
    """Doctor names the repair of an unreadable production; the gate replaces it with a readable
    candidate (plain or --force), never promotes an unreadable candidate, and after the named
    re-registration promotes the repaired version on its score."""
    register(project, MISSES_TWO, MISSES_TWO, "v1")
    assert promote(params(project), project).action == "promoted"
    register(project, PERFECT, OTHER, "v2")
    corrupt(project, "1")
    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 1, doctor.stderr
    assert "@production (v1) does not load" in doctor.stdout
    assert "python -m finetune promote --force (or python -m finetune promote --version 2)" in doctor.stdout
    # Policy: the plain gate treats an unreadable production as none, loudly.
    decision = promote(params(project), project)
    assert decision.action == "promoted" and production(project) == "2"
    assert decision.reason.startswith("production v1 unreadable: ") and decision.production_score is None

    register(project, MISSES_TWO, MISSES_TWO, "v3")  # worse than v2 (0.9 vs 1.0)
    corrupt(project, "2")
    forced = cli(project, "finetune", "promote", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "forced: production v2 unreadable" in forced.stdout and production(project) == "3"

    register(project, PERFECT, PERFECT, "v4")
    corrupt(project, "4")
    with pytest.raises(RegistryError, match="version 4 .* is unreadable"):
        promote(params(project), project, force=True)
    assert production(project) == "3"
    broken = cli(project, "finetune", "doctor")  # the candidate does not load
    assert broken.returncode == 1 and "@candidate (v4) does not load" in broken.stdout, broken.stdout
    repair = "python -m finetune.stages.register --models models --new-version"
    assert f"repair: {repair}" in broken.stdout
    fixed = cli(project, *repair.split()[2:])  # from the same model.pt, no training
    assert fixed.returncode == 0 and "registered as hotdog-classifier version 5 @candidate" in fixed.stdout, fixed.stderr
    # v5 is v4's PERFECT model.pt again, readable: scored 1.0 against production v3's 0.9 (MISSES_TWO),
    # a gain above register.min_improvement (0.0): the plain gate promotes it.
    again = promote(params(project), project)
    assert again.action == "promoted" and production(project) == "5", again.reason
    assert (again.candidate_score, again.production_score) == (1.0, 0.9)
    assert again.reason.startswith("accuracy 1.0000 (candidate v5) vs 0.9000 (production v3) on the same test data")


def test_a_lost_store_is_re_registered_without_retraining(project):
    first = register(project, OTHER, PERFECT, "s1")
    promote(params(project), project)
    model = project / "models" / first.variant / "model.pt"
    stamp = model.stat().st_mtime_ns
    shutil.rmtree(project / "mlflow")
    (project / "mlflow").mkdir()  # rm -rf mlflow/*

    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 1 and f"repair: {REGISTER}" in doctor.stdout, doctor.stdout
    assert "not in the registry" in doctor.stdout

    again = cli(project, "finetune.stages.register", "--models", "models")  # what REGISTER runs
    assert again.returncode == 0, again.stderr
    assert model.stat().st_mtime_ns == stamp  # nothing retrained
    # A fresh process: this one's SQLite connections still see the deleted database file.
    check = cli(project, "-c", (
        "from mlflow.tracking import MlflowClient; from finetune.tracking.store import use_store; "
        "from pathlib import Path; use_store(Path('.')); c = MlflowClient(); "
        f"v = c.get_model_version('{first.model_name}', '1'); "
        "print(v.tags['run_id'], v.run_id, c.get_run(v.tags['run_id']).info.run_id)"))
    assert check.returncode == 0, check.stderr
    tag, source, found = check.stdout.split()
    assert tag == source == found != first.run_id  # the run the model was logged to, and it exists
    assert f"run {tag}) registered as" in again.stdout

    # The registry is back but has no production (issue 23: doctor said "all consistent" here).
    after = cli(project, "finetune", "doctor")
    assert after.returncode == 1 and "but no production alias" in after.stdout, after.stdout + after.stderr
    assert "repair: python -m finetune promote (the gate promotes the candidate v1" in after.stdout
    assert cli(project, "finetune", "promote").returncode == 0 and production(project) == "1"
    fixed = cli(project, "finetune", "doctor")
    assert fixed.returncode == 0 and "all consistent" in fixed.stdout, fixed.stdout + fixed.stderr


def test_rollback_and_promote_version_from_any_state(project):
    register(project, MISSES_TWO, MISSES_TWO, "r1")
    register(project, PERFECT, OTHER, "r2")
    with pytest.raises(RegistryError, match=r"no version 99 \(registered versions: 1, 2\)"):
        promote(params(project), project, version="99")
    promote(params(project), project)  # production v2, history [2]
    with pytest.raises(RegistryError, match="no earlier production version.*promote --version N"):
        rollback(params(project), project)
    assert promote(params(project), project, version="1", force=True).action == "promoted"
    assert production(project) == "1"
    use_store(project)
    client = MlflowClient()
    name = params(project).register_.model_name
    client.delete_model_version(name, "2")  # the history [2, 1] now names a version that is gone
    with pytest.raises(RegistryError, match="registered versions: 1"):
        rollback(params(project), project)
    client.delete_registered_model_alias(name, PRODUCTION)  # no production at all
    back = rollback(params(project), project)
    assert (back.production_before, back.production_after) == (None, "1") and production(project) == "1"
    client.delete_registered_model_alias(name, PRODUCTION)
    assert promote(params(project), project, version="1").reason == "no production version yet"


def test_doctor_notes_a_register_that_registered_nothing(project):
    register(project, PERFECT, OTHER, "n1")
    assert promote(params(project), project).action == "promoted"
    nothing = register(project, HOTDOG, OTHER, "n2")  # both give one class for every image: chance
    assert not nothing.registered and nothing.version is None
    doctor = cli(project, "finetune", "doctor")
    # Nothing disagrees (candidate and production are v1, as before): a note, not a failure.
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert ("note: the last register stage registered nothing (reports/register.json): finetune did no better "
            "than chance (accuracy 0.500, chance 0.500, binomial p = 0.59)") in doctor.stdout
    assert "train variants that learn" in doctor.stdout


def test_an_unreadable_production_that_is_the_candidate_and_a_missing_production_alias(project):
    """Issue 23: with candidate = production and production unreadable, doctor named
    `promote --force`, which says "unchanged"; after a lost and repaired store it said "all
    consistent" with no production alias. Each named repair is run here and works."""
    register(project, PERFECT, OTHER, "e1")
    assert promote(params(project), project).action == "promoted"  # candidate = production = v1
    corrupt(project, "1")
    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 1 and "@production (v1) does not load" in doctor.stdout, doctor.stdout
    repair = "python -m finetune.stages.register --models models --new-version"
    assert f"repair: {repair}, then python -m finetune promote\n" in doctor.stdout, doctor.stdout
    assert cli(project, *repair.split()[2:]).returncode == 0
    promoted = cli(project, "finetune", "promote")
    assert promoted.stdout.startswith("promoted: ") and "v1 -> v2" in promoted.stdout, promoted.stdout
    assert production(project) == "2"

    use_store(project)
    MlflowClient().delete_registered_model_alias(params(project).register_.model_name, PRODUCTION)
    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 1 and "(1, 2) but no production alias" in doctor.stdout, doctor.stdout
    assert "repair: python -m finetune rollback (restores v2" in doctor.stdout
    assert cli(project, "finetune", "rollback").returncode == 0 and production(project) == "2"
    after = cli(project, "finetune", "doctor")
    assert after.returncode == 0 and "all consistent" in after.stdout, after.stdout + after.stderr


DVC_YAML = """stages:
  fetch:
    cmd: "true"
    outs:
      - data/hotdog:
          persist: true
  train:
    foreach: [finetune, scratch]
    do:
      cmd: "true"
      outs:
        - models/${item}:
            persist: true
"""


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def cache_object(project: Path, md5: str) -> Path:
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def spoil(path: Path) -> None:
    path.chmod(0o644)  # DVC keeps its cache read-only
    path.write_bytes(b"not what the hash says")


def checked(project: Path) -> list:
    """doctor's findings, in this process (the command's own output is checked once per case above)."""
    return diagnose(params(project), project)


def test_doctor_names_damaged_dvc_cache_objects_and_set_aside_checkpoints(project):
    """A corrupted object of the data dir, then one whose workspace copy is gone too, then a
    missing object of a model: each named with its repair, which is run and works. Doctor hashes
    the objects itself: the corrupted one is still there after it ran (`dvc status` deletes it)."""
    save_variant(project, "finetune", PERFECT, "d-ft")
    save_variant(project, "scratch", OTHER, "d-sc")
    (project / "dvc.yaml").write_text(DVC_YAML)
    dvc(project, "init", "--no-scm", "-q")
    dvc(project, "remote", "add", "-d", "store", str(project.parent / "remote"))
    dvc(project, "commit", "--force", "-q")
    dvc(project, "push", "-q")
    assert checked(project) == []

    image = project / "data" / "hotdog" / "test" / "hotdog" / "0001.jpg"
    spoil(cache_object(project, md5_of(image)))
    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "the DVC cache of data/hotdog (stage fetch in dvc.lock) has 1 corrupted (" in doctor.stdout
    assert "repair: dvc commit --force fetch (the workspace copy" in doctor.stdout
    assert cache_object(project, md5_of(image)).read_bytes() == b"not what the hash says"  # named, not deleted
    dvc(project, "commit", "--force", "fetch", "-q")
    assert checked(project) == []

    data = image.read_bytes()
    spoil(cache_object(project, md5_of(image)))
    image.unlink()  # the workspace copy gone as well: only the remote has it
    (found,) = checked(project)
    assert found.repair.startswith("dvc fetch fetch && dvc checkout fetch (from the remote 'store'"), found
    dvc(project, "fetch", "fetch", "-q")
    dvc(project, "checkout", "fetch", "-q")
    assert image.read_bytes() == data and checked(project) == []

    model = project / "models" / "scratch" / "model.pt"
    cache_object(project, md5_of(model)).unlink()
    (found,) = checked(project)
    assert found.problem.startswith("the DVC cache of models/scratch (stage train@scratch in dvc.lock) has 1 missing (")
    assert found.repair.startswith("dvc commit --force train@scratch"), found
    dvc(project, "commit", "--force", "train@scratch", "-q")

    # A checkpoint set aside inside the output by an older version: a note with the move out.
    (project / "models" / "finetune" / "checkpoint.pt.corrupt-20261207T120000").write_bytes(b"x")
    doctor = cli(project, "finetune", "doctor")
    assert doctor.returncode == 0, doctor.stdout
    assert ("repair: mkdir -p models/set-aside/finetune && mv models/finetune/checkpoint.pt.corrupt-20261207T120000 "
            "models/set-aside/finetune/") in doctor.stdout
