"""Production can always be repaired (issue 16): an unreadable production, a lost MLflow store,
rollback and `promote --version` from any state, and `python -m finetune doctor` naming each
mismatch with its repair. Real models, the project's own SQLite store, real subprocesses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from models import MISSES_TWO, PERFECT, params, project_with_data, save_variant

from finetune.stages.evaluate import EvalPaths, run_evaluate
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
    assert promote(params(project), project).action in ("promoted", "refused")  # v5 loads and is scored


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

    after = cli(project, "finetune", "doctor")
    assert after.returncode == 0 and "all consistent" in after.stdout, after.stdout + after.stderr


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
