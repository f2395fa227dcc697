"""The promotion gate's policy on plain numbers (no torch, no MLflow): whether a scored candidate
takes ``production`` from the version that holds it, and the reason recorded either way.

The rules, in order:

1. a candidate that already is production leaves it unchanged (nothing is scored);
2. a candidate no better than chance on the current test split is refused, ``force`` or not: a
   model that does no better than always answering the largest class serves nothing;
3. with no production yet, the candidate is promoted;
4. an unreadable production counts as no valid production: the candidate is promoted (a
   production that cannot be loaded serves nothing, so any model that loads is better);
5. otherwise the candidate must beat production on ``metric`` by more than nothing and by at
   least ``min_improvement`` (register.min_improvement); ``force`` promotes it anyway.

The registry (finetune/tracking/registry.py) scores the versions in between the rules, only as
far as they need: :func:`settled` before any scoring, :func:`first_rules` once the candidate is
scored, :func:`against_production` once production is. :func:`decide` is the whole policy at
once, for numbers already known.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.evaluate.metrics import ChanceTest, better

PROMOTED, REFUSED, UNCHANGED = "promoted", "refused", "unchanged"


@dataclass(frozen=True)
class Gate:
    """What the gate judges by: ``metric`` (register.metric) and the least gain it takes."""

    metric: str
    min_improvement: float


@dataclass(frozen=True)
class Candidate:
    """The version asking for production, scored on the current test split: its ``metric``
    score and its test against chance."""

    version: str
    score: float
    chance: ChanceTest


@dataclass(frozen=True)
class Production:
    """The version holding production: its score on the same test data, or why it could not be
    scored (``unreadable``); neither before it is scored."""

    version: str
    score: float | None = None
    unreadable: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: ``action`` (promoted, refused, unchanged), the version production
    holds after it, the production score it was judged against (None: not scored), and why."""

    action: str
    production_after: str | None
    production_score: float | None
    reason: str


def decide(gate: Gate, candidate: Candidate, production: Production | None, force: bool = False) -> Verdict:
    """The whole policy (see the module's rules) for a scored candidate and production."""
    return (settled(candidate.version, production) or first_rules(candidate, production, force)
            or against_production(gate, candidate, production, force))


def settled(candidate: str, production: Production | None) -> Verdict | None:
    """Rule 1: unchanged when ``candidate`` (a version) already is production; else None."""
    if production is None or production.version != candidate:
        return None
    return Verdict(UNCHANGED, production.version, None, f"version {candidate} is already production")


def first_rules(candidate: Candidate, production: Production | None, force: bool) -> Verdict | None:
    """Rules 2 and 3: the chance floor (which ``force`` does not override), then no production
    yet; None when production must be scored to decide."""
    kept = production.version if production is not None else None
    if not candidate.chance.above:
        return Verdict(REFUSED, kept, None, chance_refusal(candidate.version, candidate.chance, force))
    if production is None:
        return Verdict(PROMOTED, candidate.version, None, "no production version yet")
    return None


def against_production(gate: Gate, candidate: Candidate, production: Production, force: bool) -> Verdict:
    """Rules 4 and 5: a candidate above chance against a production that was scored (or could
    not be); ``force`` promotes a candidate that does not gain enough, and says so."""
    if production.unreadable is not None:
        reason = (f"production v{production.version} unreadable: {production.unreadable}; treated as no valid "
                  f"production, v{candidate.version} promoted ({gate.metric} {candidate.score:.4f})")
        return Verdict(PROMOTED, candidate.version, None, f"forced: {reason}" if force else reason)
    gain = better(gate.metric, candidate.score, production.score)
    passed = gain > 0 and gain >= gate.min_improvement
    numbers = (f"{gate.metric} {candidate.score:.4f} (candidate v{candidate.version}) vs {production.score:.4f} "
               f"(production v{production.version}) on the same test data: gain {gain:+.4f}, "
               f"required > 0 and >= {gate.min_improvement}")
    if passed or force:
        return Verdict(PROMOTED, candidate.version, production.score, numbers if passed else f"forced: {numbers}")
    return Verdict(REFUSED, production.version, production.score, numbers)


def chance_refusal(version: str, chance: ChanceTest, force: bool) -> str:
    """The recorded reason for refusing a candidate at chance on the current test split."""
    return (f"candidate v{version} did {chance.reason()} on the current test split "
            f"({chance.right} of {chance.images} right): a model at chance is never promoted"
            + (", and --force does not override this floor" if force else ""))
