"""`python -m finetune doctor`: do dvc.lock, models/, the MLflow runs and the registry agree, do
the registered models do better than chance on the current test split, and do they load where
this project is not installed?

Each check that fails gives one :class:`Finding`: what is wrong and the exact command that repairs
it. Notes (``fatal=False``) are printed but do not fail the check: a training run lost with the
store, for a model that is not registered, costs its history, not the model; a register that
registered nothing, or a candidate at chance (the gate refuses it), leaves nothing broken. A
production at chance fails the check: it serves answers no better than guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune.core.config import Params
from finetune.model.classifier import read_final
from finetune.tracking.cache_check import damaged
from finetune.tracking.registry import CANDIDATE, PRODUCTION, production_history, registered_versions, run_exists
from finetune.tracking.serving import evaluate_registered, load_served, portable
from finetune.tracking.store import use_store
from finetune.train.checkpoints import CHECKPOINT, set_aside_folder

REGISTER = "dvc repro --force --single-item register"
# A version whose files are broken is not replaced by REGISTER (it reuses the same training's version).
REREGISTER = "python -m finetune.stages.register --models models --new-version"
RETRAIN = ("train variants that learn (more epochs or train images, train: in params.yaml), then `dvc repro`; "
           "the gate promotes a candidate only if it beats chance")


@dataclass(frozen=True)
class Finding:
    """One mismatch: what is wrong, the command that repairs it; ``fatal=False`` for a note."""

    problem: str
    repair: str
    fatal: bool = True


def diagnose(params: Params, project: Path = Path(".")) -> list[Finding]:
    """Every mismatch between dvc.lock, models/, the MLflow runs and the registry."""
    use_store(project)
    client = MlflowClient()
    name = params.register_.model_name
    fingerprints = _registered_fingerprints(client, name)
    findings = []
    for variant, path in _model_files(params, project).items():
        findings += _check_model(client, project, variant, path, fingerprints)
    findings += _check_record(client, params, project)
    findings += _check_aliases(client, params, project)
    findings += [Finding(d.problem(), d.repair) for d in damaged(project, str(params.data.dir))]
    findings += _check_set_aside(project)
    return findings


def _check_set_aside(project: Path) -> list[Finding]:
    """Set-aside checkpoints left inside a DVC output (older versions put them there), where
    every `dvc repro` caches them and `dvc push` sends them: a note, with the move out."""
    found = sorted((project / "models").glob(f"*/{CHECKPOINT}.corrupt-*"))
    return [Finding(f"{path.relative_to(project)} (a checkpoint set aside as unreadable) lies inside the DVC output "
                    f"models/{path.parent.name}: it is cached and pushed with it",
                    f"mkdir -p {set_aside_folder(path.parent).relative_to(project)} && mv {path.relative_to(project)} "
                    f"{set_aside_folder(path.parent).relative_to(project)}/ (or delete it)", fatal=False)
            for path in found]


def _model_files(params: Params, project: Path) -> dict[str, Path]:
    """models/<variant>/model.pt of every variant under train: and every train stage dvc.lock
    knows (the source model of pretrain is no variant: it is never registered)."""
    files = {variant: project / "models" / variant / "model.pt" for variant in params.train}
    lock = project / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    for stage in stages:
        if stage.startswith("train@"):
            variant = stage.split("@", 1)[1]
            files.setdefault(variant, project / "models" / variant / "model.pt")
    return files


def _registered_fingerprints(client: MlflowClient, name: str) -> set[str]:
    """Fingerprints of the versions whose run exists (their model is in the store)."""
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return set()
    return {v.tags.get("fingerprint") for v in found if run_exists(client, v.tags.get("run_id") or v.run_id)}


def _check_model(client, project: Path, variant: str, path: Path, fingerprints: set[str]) -> list[Finding]:
    """The model file loads; its training run exists (or the model is registered elsewhere)."""
    shown = path.relative_to(project) if path.is_relative_to(project) else path
    try:
        state = read_final(path)
    except Exception as err:
        return [Finding(f"{shown} is unreadable: {str(err).splitlines()[0]}",
                        f"dvc repro --force --single-item train@{variant}")]
    run_id = state.get("mlflow_run_id")
    if run_exists(client, run_id) or state.get("fingerprint") in fingerprints:
        return []
    return [Finding(f"{shown} names MLflow run {run_id or '(none)'}, which is not in the tracking store "
                    "(its training history is lost; the model file is fine)",
                    f"{REGISTER} (re-registers the winner without retraining; "
                    f"`dvc repro --force --single-item train@{variant}` retrains to record the run again)",
                    fatal=False)]


def _check_record(client, params: Params, project: Path) -> list[Finding]:
    """reports/register.json (register.record) names a version that exists and whose run exists."""
    record = project / params.register_.record
    lock = project / "dvc.lock"
    if not record.is_file():
        done = lock.is_file() and "register" in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {})
        return [Finding(f"dvc.lock records the register stage but {params.register_.record} is missing",
                        REGISTER)] if done else []
    document = json.loads(record.read_text())
    if not document.get("registered", True):
        return [Finding(f"the last register stage registered nothing ({params.register_.record}): "
                        f"{document.get('reason', 'no reason recorded')}", RETRAIN, fatal=False)]
    name, version = document.get("model_name"), str(document.get("version"))
    if version not in registered_versions(client, name):
        return [Finding(f"{params.register_.record} names {name} version {version}, which is not in the "
                        "registry (the MLflow store was lost or reset); DVC still thinks register is done",
                        REGISTER)]
    tag = client.get_model_version(name, version).tags.get("run_id")
    if not run_exists(client, tag):
        return [Finding(f"{name} version {version} (in {params.register_.record}) has run_id tag {tag or '(none)'}, "
                        "which is not in the tracking store", REGISTER)]
    return []


def _check_aliases(client, params: Params, project: Path) -> list[Finding]:
    """``candidate`` and ``production`` point at versions whose model loads and does better than
    chance on the current test split."""
    name = params.register_.model_name
    findings = []
    try:
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return []  # nothing registered: the record check says what to run
    if PRODUCTION not in aliases and registered_versions(client, name):
        findings.append(_no_production(client, name, aliases))
    for alias in (CANDIDATE, PRODUCTION):
        if alias not in aliases:
            continue
        model, why = _load(f"models:/{name}/{aliases[alias]}", project)
        if why is None:
            findings += _check_portable(name, alias, aliases[alias], model)
            findings += _check_chance(params, project, alias, aliases[alias], model)
            continue
        if alias == CANDIDATE:
            findings.append(Finding(f"{name}@{alias} (v{aliases[alias]}) does not load: {why}", REREGISTER))
            continue
        findings.append(Finding(f"{name}@{alias} (v{aliases[alias]}) does not load: {why}",
                                _production_repair(client, name, project, aliases)))
    return findings


def _production_repair(client, name: str, project: Path, aliases: dict[str, str]) -> str:
    """How to replace an unreadable production. When the candidate is that same version, the
    gate (forced or not) has nothing to move ("unchanged"): register the model again as a new
    version first, which becomes the candidate, and the gate then replaces the unreadable one."""
    readable = _readable_version(client, name, project, exclude=aliases[PRODUCTION])
    if aliases.get(CANDIDATE) == aliases[PRODUCTION]:
        other = f" (or python -m finetune promote --version {readable})" if readable else ""
        return f"{REREGISTER}, then python -m finetune promote{other}"
    return (f"python -m finetune promote --force (or python -m finetune promote --version {readable})"
            if readable else f"{REREGISTER}, then python -m finetune promote --force")


def _no_production(client, name: str, aliases: dict[str, str]) -> Finding:
    """Versions are registered but none is production (a store lost and repaired, the alias
    deleted): `serve` and `predict` have nothing to load."""
    history = [v for v in production_history(client, name) if v in registered_versions(client, name)]
    if history:
        repair = (f"python -m finetune rollback (restores v{history[-1]}, the last production still registered), "
                  "or python -m finetune promote, which runs the gate on the candidate")
    elif CANDIDATE in aliases:
        repair = f"python -m finetune promote (the gate promotes the candidate v{aliases[CANDIDATE]} if it beats chance)"
    else:
        repair = "python -m finetune promote --version N, naming a registered version"
    return Finding(f"{name} has registered versions ({', '.join(registered_versions(client, name))}) but no "
                   "production alias: `serve` and `predict` have no model to load", repair)


def _check_chance(params: Params, project: Path, alias: str, version: str, model) -> list[Finding]:
    """The version ``alias`` points at, scored on the current test split, against chance
    (evaluate.chance_p): at chance is a note for the candidate (the gate refuses it) and a
    failure for production (it serves answers no better than guessing)."""
    label = f"{params.register_.model_name}@{alias} (v{version})"
    try:
        chance = evaluate_registered(params, f"models:/{params.register_.model_name}/{version}", project, model).chance
    except Exception as err:  # the model loads (checked before): the test split is what is missing
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return [Finding(f"{label} could not be tested against chance on the current test split: {why}",
                        "dvc repro validate (the test split's file list, validate.files)", fatal=False)]
    if chance.above:
        return []
    problem = f"{label} did {chance.reason()} on the current test split ({chance.right} of {chance.images} right)"
    if alias == CANDIDATE:
        return [Finding(f"{problem}; the gate never promotes it", RETRAIN, fatal=False)]
    return [Finding(f"{problem}: it serves answers no better than always giving the largest class",
                    f"{RETRAIN}; or python -m finetune promote --version N, naming a version that beats chance")]


def _check_portable(name: str, alias: str, version: str, model) -> list[Finding]:
    """A version registered before models shipped their own code loads only where this project
    is installed: register the same model again (a new version, portable) and move the alias to
    it through the gate, whose decision log keeps the old version for a rollback."""
    if portable(model):
        return []
    repair = f"{REREGISTER}, then python -m finetune promote --force" if alias == PRODUCTION else REREGISTER
    return [Finding(f"{name}@{alias} (v{version}) loads only where this project is installed (it was registered "
                    "before models carried their own code): another team's service or `mlflow models serve` "
                    "elsewhere cannot load it", repair)]


def _load(uri: str, project: Path):
    """(the model at ``uri``, None) when it loads, else (None, why not: its first line)."""
    try:
        return load_served(uri, project), None
    except Exception as err:
        return None, (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _unreadable(uri: str, project: Path) -> str | None:
    """None when the model at ``uri`` loads, else why not (first line)."""
    return _load(uri, project)[1]


def _readable_version(client, name: str, project: Path, exclude: str) -> str | None:
    """The newest version other than ``exclude`` whose model loads."""
    for version in reversed(registered_versions(client, name)):
        if version != exclude and _unreadable(f"models:/{name}/{version}", project) is None:
            return version
    return None
