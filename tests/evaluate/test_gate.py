"""The promotion gate's policy on plain numbers (finetune/evaluate/gate.py): no MLflow, no torch,
no model; the registry's end-to-end checks are in tests/tracking/test_registry.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from finetune.evaluate.gate import Candidate, Gate, Production, decide
from finetune.evaluate.metrics import ChanceTest

GATE = Gate("accuracy", min_improvement=0.02)
ABOVE = ChanceTest(right=19, images=20, chance=0.5, p_value=2e-5, alpha=0.01)
AT_CHANCE = ChanceTest(right=10, images=20, chance=0.5, p_value=0.59, alpha=0.01)


def candidate(score: float = 0.95, chance: ChanceTest = ABOVE) -> Candidate:
    return Candidate("2", score, chance)


@pytest.mark.parametrize("production", [None, Production("1", 0.5), Production("1", unreadable="gone")])
@pytest.mark.parametrize("force", [False, True])
def test_a_candidate_at_chance_is_never_promoted(production, force):
    verdict = decide(GATE, candidate(0.5, AT_CHANCE), production, force)
    assert verdict.action == "refused" and verdict.production_after == (production and production.version)
    assert "a model at chance is never promoted" in verdict.reason and "(10 of 20 right)" in verdict.reason
    assert ("--force does not override this floor" in verdict.reason) is force
    assert verdict.production_score is None  # production is not scored for a candidate at chance


def test_the_first_production_is_any_candidate_above_chance():
    verdict = decide(GATE, candidate(), None)
    assert (verdict.action, verdict.production_after, verdict.reason) == ("promoted", "2", "no production version yet")


@pytest.mark.parametrize(("score", "action"), [(0.95, "promoted"), (0.92, "promoted"), (0.919, "refused"),
                                               (0.90, "refused"), (0.80, "refused")])
def test_the_candidate_must_beat_production_by_the_margin(score, action):
    verdict = decide(GATE, candidate(score), Production("1", 0.90))
    assert verdict.action == action and verdict.production_score == 0.90
    assert verdict.production_after == ("2" if action == "promoted" else "1")
    assert f"gain {score - 0.90:+.4f}, required > 0 and >= 0.02" in verdict.reason


def test_a_margin_of_zero_still_needs_a_gain():
    tie = decide(Gate("accuracy", 0.0), candidate(0.90), Production("1", 0.90))
    assert tie.action == "refused" and "gain +0.0000" in tie.reason


def test_a_metric_where_lower_is_better_gains_downwards():
    assert decide(Gate("log_loss", 0.01), candidate(0.20), Production("1", 0.30)).action == "promoted"
    assert decide(Gate("log_loss", 0.01), candidate(0.30), Production("1", 0.20)).action == "refused"


def test_force_promotes_a_candidate_that_gains_too_little_and_says_so():
    verdict = decide(GATE, candidate(0.80), Production("1", 0.90), force=True)
    assert verdict.action == "promoted" and verdict.production_after == "2" and verdict.reason.startswith("forced: ")


def test_an_unreadable_production_counts_as_none():
    verdict = decide(GATE, candidate(0.80), Production("1", unreadable="its files are gone"))
    assert verdict.action == "promoted" and verdict.production_score is None
    assert verdict.reason.startswith("production v1 unreadable: its files are gone; treated as no valid production")
    assert decide(GATE, candidate(0.80), Production("1", unreadable="x"), force=True).reason.startswith("forced: ")


def test_a_candidate_that_is_production_leaves_it_unchanged_even_at_chance():
    verdict = decide(GATE, candidate(0.5, AT_CHANCE), Production("2", 0.5))
    assert (verdict.action, verdict.production_after, verdict.reason) == (
        "unchanged", "2", "version 2 is already production")


def test_the_policy_imports_neither_torch_nor_mlflow():
    code = ("import json, sys; import finetune.evaluate.gate; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"torch", "mlflow", "torchvision"}, sorted(loaded & {"torch", "mlflow", "torchvision"})
