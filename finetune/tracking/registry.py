"""The MLflow model registry: register the compared variant that validates best, of those above
chance on the test split, as ``candidate`` (the register stage's work), promote it to
``production`` through a gate whose first rule is the same floor (the gate's policy, on plain
numbers: finetune/evaluate/gate.py; this module scores the versions and records the decision),
roll back. Aliases only (registry stages are deprecated in MLflow 3).

Every decision is recorded twice: as tags on the versions involved and as one JSON line in the
promotion log, an artifact of the run ``registry-<model name>`` (in the experiment
``finetune-registry``, apart from the training runs). The production history (a stack
of versions, newest last) is a tag of the registered model, so rollback needs nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune.core.config import Params
from finetune.core.errors import FinetuneError
from finetune.core.files import fingerprint_of, write_atomic
from finetune.data.lineage import data_version, git_commit
from finetune.evaluate import gate
from finetune.evaluate.metrics import (
    VariantEval,
    above_chance,
    chance_words,
    choose_by_validation,
    validation_uncertainty,
    winner,
)
from finetune.evaluate.report import study_verdict
from finetune.model.classifier import load_classifier, read_final
from finetune.tracking.card import model_card, with_judgment
from finetune.tracking.packaging import log_classifier, served_limits
from finetune.tracking.runs import logged_model_uri
from finetune.tracking.serving import evaluate_registered
from finetune.tracking.store import (
    NOTE_TAG,
    pipeline_experiment,
    pipeline_experiment_name,
    registry_experiment,
    use_store,
)

log = logging.getLogger(__name__)
CANDIDATE, PRODUCTION = "candidate", "production"
HISTORY_TAG = "production_history"
# A version's tag naming its model as MLflow's pytorch flavour (models:/<id>: the logged model the
# version registers, which carries both flavours): `mlflow.pytorch.load_model(<tag value>)` gives
# the torch module the pyfunc wraps, as does `mlflow.pytorch.load_model("models:/<name>/<version>")`.
NETWORK_TAG = "pytorch_model"
LOG_TAG, LOG_FILE = "finetune.registry_log", "promotions.jsonl"
# How long a promotion or rollback waits for another one of the same model (on this machine) to
# finish: a gate run scores two models, seconds to minutes; longer means a hung process.
LOCK_WAIT_S = 900
# A gate decision taken again when production moved while it scored (another machine's promotion).
DECIDE_TRIES = 3
# A compared variant's test against chance, as the evaluate stage's metrics hold it and the
# register record repeats it; CHANCE_WORDS in the order chance_words takes them.
CHANCE_KEYS = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "chance_accuracy", "chance_p_value",
               "above_chance")
CHANCE_WORDS = ("accuracy", "chance_accuracy", "chance_p_value")


class RegistryError(FinetuneError):
    """A registry action cannot be done; the message says why and what to run."""


@dataclass(frozen=True)
class Registration:
    """What the register stage did (its record, register.record): the version it made or found
    (the same model registered before), or ``registered: false`` and why (no compared variant
    beat chance). ``uncertainty``: of ``value`` (see ``validation_uncertainty``); ``chance``: each
    compared variant's test against chance, from the evaluate stage's metrics."""

    model_name: str
    version: str | None
    variant: str | None
    run_id: str | None
    metric: str
    value: float | None
    reused: bool
    registered: bool = True
    reason: str = ""
    uncertainty: dict | None = None
    chance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    """The compared variant to register (None: none beat chance), the score it was chosen by,
    that score's uncertainty, and why, in words."""

    variant: str | None
    metric: str
    value: float | None
    uncertainty: dict | None
    reason: str


@dataclass(frozen=True)
class Decision:
    """One promotion or rollback decision, as recorded."""

    action: str  # promoted | refused | unchanged | rolled_back
    model_name: str
    candidate: str | None
    production_before: str | None
    production_after: str | None
    metric: str
    candidate_score: float | None
    production_score: float | None
    min_improvement: float
    reason: str
    time: str


# --- register --------------------------------------------------------------------------------------


def register_candidate(params: Params, models: Path, project: Path = Path("."), reuse: bool = True) -> Registration:
    """Register the chosen variant's model (:func:`choose_variant`) as a new version with the alias
    ``candidate``; with ``reuse``, a version of the same training (fingerprint) whose run exists
    is taken instead (``reuse=False`` replaces one whose files in the artifact store are broken).
    When no compared variant beat chance nothing is registered, the aliases are left as they
    are, and the record says why. The record (register.record) is written either way."""
    cfg = params.register_
    metrics_file = project / params.evaluate.metrics
    if not metrics_file.exists():
        raise RegistryError(f"{metrics_file} (evaluate.metrics) does not exist: run `dvc repro evaluate` first.")
    document = json.loads(metrics_file.read_text())
    choice = choose_variant(params, document, project / models)
    floors = {name: {k: document[name][k] for k in CHANCE_KEYS} for name in compared(params)}
    if choice.variant is None:
        result = Registration(cfg.model_name, None, None, None, choice.metric, None, False, registered=False,
                              reason=choice.reason, chance=floors)
    else:
        version, run_id, reused = _register_version(params, project, project / models / choice.variant, document,
                                                    reuse, choice.reason)
        result = Registration(cfg.model_name, str(version), choice.variant, run_id, choice.metric, choice.value,
                              reused, reason=choice.reason, uncertainty=choice.uncertainty, chance=floors)
    write_atomic(project / cfg.record, lambda tmp: tmp.write_text(json.dumps(asdict(result), indent=2) + "\n"))
    return result


def _register_version(params: Params, project: Path, folder: Path, document: dict, reuse: bool, reason: str):
    """(version, run id, reused): ``folder``/model.pt registered (or its earlier version found),
    with the alias ``candidate``; a new version's description is its model card (``reason``:
    why it was chosen)."""
    cfg = params.register_
    checkpoint = folder / "model.pt"
    classifier = load_classifier(checkpoint)
    run_id, fingerprint = classifier.info.get("mlflow_run_id"), classifier.info.get("fingerprint")
    use_store(project)
    client = MlflowClient()
    version = _version_with(client, cfg.model_name, fingerprint) if reuse else None
    reused = version is not None
    if version is None:
        tags = version_tags(params, project, folder.name, run_id, fingerprint, document[folder.name])
        version = _new_version(client, params, project, checkpoint, run_id, tags, fresh=not reuse)
        card = model_card(params, version.tags, classifier.info, document[folder.name], reason)
        version = client.update_model_version(cfg.model_name, version.version, description=card)
    client.set_registered_model_alias(cfg.model_name, CANDIDATE, version.version)
    return version.version, version.tags.get("run_id") or run_id, reused  # the run the model was logged to


def compared(params: Params) -> list[str]:
    """The compared variants, challenger first: the only ones register chooses from."""
    return [params.evaluate.challenger, params.evaluate.baseline]


def choose_variant(params: Params, document: dict, models: Path) -> Choice:
    """The compared variant to register: of those above chance on the test split (the evaluate
    metrics' ``above_chance``), the one with the best validation accuracy of its kept epoch, a
    tie going to the lower validation loss, then to the challenger (validation watches, test
    judges: test metrics are reported, not used to choose). Only when a variant trained without
    a validation split does ``register.metric`` on the test split decide, with a warning. None
    when no compared variant beat chance: a model that did not learn is never a candidate."""
    names = compared(params)
    failed = [name for name in names if not above_chance(document[name])]
    excluded = " and ".join(f"{name} did {chance_words(*(document[name][k] for k in CHANCE_WORDS))}"
                            for name in failed)
    passed = [name for name in names if name not in failed]
    if not passed:
        return Choice(None, "val_acc", None, None, f"{excluded} on the test split: nothing is registered, and "
                      "candidate and production stay as they were")
    infos = {name: read_final(models / name / "model.pt") for name in passed}
    scores = {name: {"val_acc": info.get("val_acc"), "val_loss": info.get("val_loss")} for name, info in infos.items()}
    note = f"; {excluded}, so it is not a candidate" if failed else ""
    if all(s["val_acc"] is not None for s in scores.values()):
        variant = choose_by_validation(scores, params.evaluate.challenger)
        return Choice(variant, "val_acc", float(scores[variant]["val_acc"]), validation_uncertainty(infos[variant]),
                      why_chosen(variant, scores) + note)
    metric = params.register_.metric
    log.warning("%s trained without a validation split (val_fraction: 0): choosing the variant by test %s",
                ", ".join(n for n, s in scores.items() if s["val_acc"] is None), metric)
    variant = winner({n: document[n] for n in passed}, metric, params.evaluate.challenger)
    entry = document[variant]
    uncertainty = None
    if metric == "accuracy":
        uncertainty = {"source": "test", "images": document["comparison"]["test_images"],
                       "ci95": [entry["accuracy_ci95_low"], entry["accuracy_ci95_high"]]}
    return Choice(variant, f"test {metric}", float(entry[metric]), uncertainty,
                  f"{variant} has the best test {metric} (no validation split to choose by){note}")


def why_chosen(variant: str, scores: dict[str, dict]) -> str:
    """Why ``variant`` won on validation: the better accuracy, or a tie and what broke it."""
    if len(scores) == 1:
        return f"{variant} is the only compared variant above chance"
    other = next(name for name in scores if name != variant)
    mine, theirs = scores[variant], scores[other]
    if mine["val_acc"] != theirs["val_acc"]:
        return (f"{variant} has the better validation accuracy ({mine['val_acc']:.4f} vs {other}'s "
                f"{theirs['val_acc']:.4f})")
    if mine.get("val_loss") != theirs.get("val_loss"):
        return (f"{variant} and {other} tie on validation accuracy ({mine['val_acc']:.4f}); {variant} has the lower "
                f"validation loss ({mine['val_loss']:.4f} vs {theirs.get('val_loss')})")
    return f"{variant} and {other} tie on validation accuracy and loss; the tie goes to the challenger, {variant}"


def _version_with(client: MlflowClient, name: str, fingerprint: str | None):
    """The version already registered for this exact training (same fingerprint), if any."""
    if not fingerprint:
        return None
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.fingerprint = '{fingerprint}'")
    except MlflowException:
        return None
    # A version whose run is gone (store partly lost) is not reused: registering again makes one
    # that links to an existing run.
    found = [v for v in found if run_exists(client, v.tags.get("run_id") or v.run_id)]
    return max(found, key=lambda v: int(v.version)) if found else None


def run_exists(client: MlflowClient, run_id: str | None) -> bool:
    """Whether the tracking store holds the run ``run_id``."""
    if not run_id:
        return False
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def version_tags(params: Params, project: Path, variant: str, run_id: str, fingerprint: str, scores: dict) -> dict:
    """Where the version came from: data and code versions, variant, run, params digest, test metrics."""
    digest = fingerprint_of(params.model_dump(mode="json", by_alias=True))
    tags = {"data_version": data_version(project, params.data.dir), "git_commit": git_commit(project),
            "variant": variant, "run_id": run_id or "", "fingerprint": fingerprint or "", "params_digest": digest}
    tags |= {f"test.{k}": f"{v:.6g}" for k, v in scores.items() if isinstance(v, float)}
    return tags


def _new_version(client: MlflowClient, params: Params, project: Path, checkpoint: Path, run_id: str | None, tags: dict,
                 fresh: bool = False):
    """Register the training run's classifier (logged by the train stage); a run that has none
    (trained before the classifier was logged there, or gone from the store) gets it logged now,
    and so does every run when ``fresh`` (the logged one's files may be what is broken)."""
    name = params.register_.model_name
    uri = logged_model_uri(run_id) if run_id and not fresh and run_exists(client, run_id) else None
    if uri is None:
        with _run_for_model(client, run_id, project, params) as run:
            uri = log_classifier(checkpoint, project / "params.yaml", served_limits(params)).model_uri
        # The tag names the run that holds the model: the training run, or the new one made when
        # the training run is gone from the store.
        run_id = run.info.run_id
    # The same model is MLflow's pytorch flavour too: mlflow.pytorch.load_model(tag) gives the torch module.
    tags = tags | {"run_id": run_id, NETWORK_TAG: uri}
    version = mlflow.register_model(uri, name, tags=tags)
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return client.get_model_version(name, version.version)


def _run_for_model(client: MlflowClient, run_id: str | None, project: Path, params: Params):
    """The training run (so the version links to it), or a new run when the model has none."""
    if run_id:
        if run_exists(client, run_id):
            return mlflow.start_run(run_id=run_id)
        log.warning("run %s is not in the tracking store: the model goes into a new run", run_id)
    experiment = pipeline_experiment(params.data.dir, project)
    return mlflow.start_run(experiment_id=experiment, run_name="register")


# --- promote and roll back -------------------------------------------------------------------------


def _alias(client: MlflowClient, name: str, alias: str):
    """The version ``name@alias``, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise  # the store unreachable or failing: not the same as "no such alias"


def evaluate_version(params: Params, project: Path, version) -> VariantEval:
    """A registered version scored on the current test split (its metrics and its test against chance)."""
    return evaluate_registered(params, f"models:/{version.name}/{version.version}", project)


def score_version(params: Params, project: Path, version) -> float:
    """``register.metric`` of a registered version on the current test split."""
    return evaluate_version(params, project, version).metrics[params.register_.metric]


def promote(params: Params, project: Path = Path("."), version: str | None = None, force: bool = False) -> Decision:
    """Move ``production`` to the candidate (or ``version``) if it beats production on the same
    test data by at least ``register.min_improvement`` and by more than nothing (or there is no
    production yet, or ``force``); record the decision either way. A candidate that does no
    better than chance on the current test split (``evaluate.chance_p``) is refused first,
    whatever production holds and whatever ``force`` says.

    An unreadable production (its files corrupted, its run or artifacts gone) is treated as no
    valid production: a readable candidate is promoted, with ``production vN unreadable: <why>``
    in the recorded reason and a warning in the log. Why this policy and not a refusal: a
    production that cannot be loaded serves nothing (`serve` and `predict` fail on it), so any
    model that loads is better, and the candidate loading from the same store shows the store
    itself answers. An unreadable candidate is never promoted (RegistryError)."""
    cfg = params.register_
    with registry_lock(use_store(project), cfg.model_name):
        client = MlflowClient()
        candidate = _version(client, cfg.model_name, version) if version else _alias(client, cfg.model_name, CANDIDATE)
        if candidate is None:
            raise RegistryError(f"{cfg.model_name} has no version with the alias {CANDIDATE!r}: run the register "
                                "stage first (`dvc repro register`).")
        decision = _decide_current(params, project, client, candidate, force)
        if decision.action == "promoted":
            client.set_registered_model_alias(cfg.model_name, PRODUCTION, candidate.version)
            _push_history(client, cfg.model_name, candidate.version)
        record(client, params, project, decision)
        return decision


def _decide_current(params: Params, project: Path, client: MlflowClient, candidate, force: bool) -> Decision:
    """The gate's decision against the production alias as it is right before the write: scoring
    takes seconds, and a promotion from another machine (which the file lock does not reach) may
    move the alias meanwhile; then the decision is taken again against the new production."""
    name = params.register_.model_name
    for _ in range(DECIDE_TRIES):
        production = _alias(client, name, PRODUCTION)
        decision = _decide(params, project, candidate, production, force)
        now = _alias(client, name, PRODUCTION)
        if _v(now) == _v(production):
            return decision
        log.warning("production of %s moved from %s to %s while the gate scored: deciding again", name,
                    _v(production), _v(now))
    raise RegistryError(f"production of {name} kept moving while the gate decided ({DECIDE_TRIES} tries): another "
                        "promotion or rollback is running against the same tracking store. Run "
                        "`python -m finetune promote` again when it is done.")


@contextlib.contextmanager
def registry_lock(store: str, name: str):
    """Hold an exclusive lock (fcntl) for model ``name`` in tracking store ``store`` on this machine:
    promotions and rollbacks of the same model serialize, whichever workspace they run from."""
    digest = hashlib.sha256(f"{store}\n{name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"finetune-registry-{digest}.lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another promotion or rollback of {name} has held {path} for over {LOCK_WAIT_S:.0f} s: "
                        "wait for it to finish (`ps` shows it), then run the command again.") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version(client: MlflowClient, name: str, version: str):
    """Version ``version`` of ``name``; RegistryError listing the versions there are when absent."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version} (registered versions: "
                            f"{', '.join(registered_versions(client, name)) or 'none'}); "
                            "name one of those in `python -m finetune promote --version N`.") from None


def registered_versions(client: MlflowClient, name: str) -> list[str]:
    """The versions of ``name`` in the registry, oldest first ([] when the model does not exist)."""
    try:
        return sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    except MlflowException:
        return []


def try_evaluate(params: Params, project: Path, version) -> tuple[VariantEval | None, str | None]:
    """(scores, None) for a version that loads and scores, (None, why) for one that does not."""
    try:
        return evaluate_version(params, project, version), None
    except Exception as err:  # corrupted files, a missing run or artifact: all mean "unreadable"
        return None, (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def try_score(params: Params, project: Path, version) -> tuple[float | None, str | None]:
    """(score, None) for a version that loads and scores, (None, why) for one that does not."""
    scored, why = try_evaluate(params, project, version)
    return (scored.metrics[params.register_.metric] if scored else None), why


def _decide(params: Params, project: Path, candidate, production, force: bool) -> Decision:
    """The gate's decision (its policy: finetune/evaluate/gate.py) on the registry's versions,
    each scored on the current test split only when a rule needs it. An unreadable candidate is
    never promoted (RegistryError)."""
    cfg = params.register_
    held = gate.Production(str(production.version)) if production is not None else None
    verdict = gate.settled(str(candidate.version), held)
    scored = None
    if verdict is None:
        scored = _scored_candidate(params, project, candidate)
        verdict = gate.first_rules(scored, held, force)
    if verdict is None:
        score, why = try_score(params, project, production)
        held = gate.Production(held.version, score, why)
        verdict = gate.against_production(gate.Gate(cfg.metric, cfg.min_improvement), scored, held, force)
        if why is not None:
            log.warning("%s", verdict.reason.removeprefix("forced: "))
    return Decision(verdict.action, cfg.model_name, str(candidate.version), held.version if held else None,
                    verdict.production_after, cfg.metric, scored.score if scored else None, verdict.production_score,
                    cfg.min_improvement, verdict.reason, time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _scored_candidate(params: Params, project: Path, candidate) -> gate.Candidate:
    """``candidate`` scored on the current test split for the gate; RegistryError when it is unreadable."""
    cfg = params.register_
    scored, why = try_evaluate(params, project, candidate)
    if why is not None:
        raise RegistryError(f"version {candidate.version} of {cfg.model_name} is unreadable ({why}): it is not "
                            "promoted. Register a readable model (`dvc repro --force --single-item register`) or "
                            "name another version (`python -m finetune promote --version N`); "
                            "`python -m finetune doctor` lists what is wrong.")
    return gate.Candidate(str(candidate.version), scored.metrics[cfg.metric], scored.chance)


def rollback(params: Params, project: Path = Path(".")) -> Decision:
    """Move ``production`` back to the version that held it before the current one: the newest
    entry of the production history that is still registered and is not the current production
    (with the production alias gone, the newest registered entry). When there is none, the
    error names the registered versions and `promote --version N`, which works from any state."""
    cfg = params.register_
    with registry_lock(use_store(project), cfg.model_name):
        return _rollback(params, project, MlflowClient())


def _rollback(params: Params, project: Path, client: MlflowClient) -> Decision:
    """rollback's work, under the registry lock."""
    cfg = params.register_
    current = _alias(client, cfg.model_name, PRODUCTION)
    history = _history(client, cfg.model_name)
    existing = registered_versions(client, cfg.model_name)
    entries = [v for v in history if v in existing]
    while entries and current is not None and entries[-1] == str(current.version):
        entries.pop()
    if not entries:
        raise RegistryError(
            f"{cfg.model_name} has no earlier production version to roll back to (production: "
            f"{_v(current)}; production history: {history or 'empty'}; registered versions: "
            f"{', '.join(existing) or 'none'}). Set production to any registered version with "
            "`python -m finetune promote --version N` (add --force to skip the gate).")
    previous = entries[-1]
    client.set_registered_model_alias(cfg.model_name, PRODUCTION, previous)
    client.set_registered_model_tag(cfg.model_name, HISTORY_TAG, json.dumps(entries))
    decision = Decision("rolled_back", cfg.model_name, candidate=None,
                        production_before=str(current.version) if current else None,
                        production_after=previous, metric=cfg.metric, candidate_score=None, production_score=None,
                        min_improvement=cfg.min_improvement, reason=f"rollback from {_v(current)} to v{previous}",
                        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record(client, params, project, decision)
    return decision


def _v(version) -> str:
    return f"v{version.version}" if version is not None else "no production alias"


def production_history(client: MlflowClient, name: str) -> list[str]:
    """The versions that held production, oldest first (the tag production_history; [] if none)."""
    try:
        return _history(client, name)
    except MlflowException:
        return []


def _history(client: MlflowClient, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _push_history(client: MlflowClient, name: str, version: str) -> None:
    """Put ``version`` on top of the production history, read right before the write; a version
    already on top is not pushed again (two promotions to it are one production period)."""
    history = _history(client, name)
    if history[-1:] != [str(version)]:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [str(version)]))


def record(client: MlflowClient, params: Params, project: Path, decision: Decision) -> None:
    """Tags on the versions involved and a line in the promotion log artifact (which keeps every
    decision). A version's ``promotion.*`` tags tell the challenge it was judged in: an
    "unchanged" run of the gate leaves them alone, so production keeps the decision that made it."""
    name = decision.model_name
    stamp = decision.time
    if decision.candidate and decision.action in ("promoted", "refused"):
        for key, value in {"promotion.decision": decision.action, "promotion.reason": decision.reason,
                           "promotion.time": stamp}.items():
            client.set_model_version_tag(name, decision.candidate, key, value)
        judge_card(client, params, project, decision)
    before = decision.production_before
    if before and before != decision.candidate:
        outcome = {"promoted": f"replaced by v{decision.candidate}", "refused": f"kept against v{decision.candidate}",
                   "rolled_back": "rolled back"}[decision.action]
        client.set_model_version_tag(name, before, "promotion.last_challenge", f"{stamp}: {outcome}")
    append_log(client, params, project, decision)


def judge_card(client: MlflowClient, params: Params, project: Path, decision: Decision) -> None:
    """The decision (and the study's verdict) as the last lines of the candidate's model card. The
    decision is made and recorded in tags already: a card that cannot be written costs a warning."""
    name = decision.model_name
    before, after = (f"v{v}" if v else "none" for v in (decision.production_before, decision.production_after))
    words = f"{decision.action} {decision.time}: production {before} → {after}: {decision.reason}"
    try:
        judged = client.get_model_version(name, decision.candidate)
        client.update_model_version(name, decision.candidate, description=with_judgment(
            judged.description or "", words, study_verdict(params, project)))
    except (MlflowException, OSError, ValueError) as err:
        log.warning("the model card of %s v%s misses the decision: %s", name, decision.candidate, err)


def append_log(client: MlflowClient, params: Params, project: Path, decision: Decision) -> None:
    """Append the decision to ``promotions.jsonl`` of the run ``registry-<model name>`` (experiment
    ``finetune-registry``)."""
    run_id = _log_run(client, params, project, decision.model_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / LOG_FILE
        path.write_text(_read_log(client, run_id, tmp) + json.dumps(asdict(decision)) + "\n")
        client.log_artifact(run_id, str(path))


def _read_log(client: MlflowClient, run_id: str, folder: str) -> str:
    """The promotion log's text ("" before the first decision). A failing download raises:
    appending to an empty log then would replace the history."""
    if LOG_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        return ""
    return Path(client.download_artifacts(run_id, LOG_FILE, folder)).read_text()


def promotion_log(params: Params, project: Path = Path(".")) -> list[dict]:
    """Every recorded decision of ``register.model_name``, oldest first."""
    use_store(project)
    client = MlflowClient()
    run_id = _log_run(client, params, project, params.register_.model_name)
    with tempfile.TemporaryDirectory() as tmp:
        text = _read_log(client, run_id, tmp)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _log_run(client: MlflowClient, params: Params, project: Path, name: str) -> str:
    """The run ``registry-<name>`` in the experiment finetune-registry, made on first use (with
    the log that an older store kept among the training runs moved into it)."""
    experiment = registry_experiment(project)
    found = _tagged_run(client, [experiment], name)
    if found:
        return found
    run_id = client.create_run(experiment, run_name=f"registry-{name}", tags={NOTE_TAG: (
        f"Promotion log of the registered model {name}: promotions.jsonl, one line per promote, refusal "
        "and rollback (the versions carry the same decision as promotion.* tags).")}).info.run_id
    client.set_terminated(run_id)
    old = client.get_experiment_by_name(pipeline_experiment_name(params.data.dir))
    previous = _tagged_run(client, [old.experiment_id], name) if old is not None else None
    if previous:
        with tempfile.TemporaryDirectory() as tmp:
            text = _read_log(client, previous, tmp)
            if text:
                (Path(tmp) / LOG_FILE).write_text(text)
                client.log_artifact(run_id, str(Path(tmp) / LOG_FILE))
    # Tagged once it holds the whole log: a crash before leaves an untagged run, and the next
    # decision moves the log again.
    client.set_tag(run_id, LOG_TAG, name)
    if previous:
        client.delete_run(previous)
        log.info("moved the promotion log of %s from run %s to run %s (experiment finetune-registry)",
                 name, previous, run_id)
    return run_id


def _tagged_run(client: MlflowClient, experiments: list[str], name: str) -> str | None:
    found = client.search_runs(experiments, filter_string=f"tags.`{LOG_TAG}` = '{name}'", max_results=1)
    return found[0].info.run_id if found else None
