"""The chance floor against values known in closed form: the exact (Clopper-Pearson) interval, the
one-sided binomial test against the majority class's share, the verdicts that name no winner when
a compared variant did no better than chance, and register's choice by validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune.evaluate.metrics import (
    accuracy_interval,
    chance_p_value,
    chance_test,
    choose_by_validation,
    majority_share,
    uncertainty_words,
    validation_uncertainty,
)
from finetune.evaluate.report import comparison_lines, verdict_line
from finetune.evaluate.study import study_markdown, summarize


def test_the_exact_interval_matches_closed_forms_and_tables():
    # All right of n: the lower bound solves p**n = 0.025; none right: 1 - p solves it.
    assert accuracy_interval(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    assert accuracy_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    # 7 of 10: the Clopper-Pearson interval as tabulated (0.3475, 0.9333).
    assert accuracy_interval(7, 10) == pytest.approx((0.3475, 0.9333), abs=5e-5)
    with pytest.raises(ValueError):
        accuracy_interval(0, 0)


def test_the_binomial_test_against_chance_matches_the_sums():
    # All 8 right at chance 1/2: 2**-8; 10 or more of 20: (2**20 + C(20, 10)) / 2 / 2**20.
    assert chance_p_value(8, 8, 0.5) == pytest.approx(2 ** -8)
    assert chance_p_value(10, 20, 0.5) == pytest.approx((2 ** 20 + math.comb(20, 10)) / 2 / 2 ** 20)
    # 3 or more of 4 at 3/4: 0.75**4 + 4 * 0.75**3 * 0.25.
    assert chance_p_value(3, 4, 0.75) == pytest.approx(0.75 ** 4 + 4 * 0.75 ** 3 * 0.25)


def test_chance_is_the_majority_share_and_a_one_class_predictor_is_at_chance():
    truth = np.array([0] * 30 + [1] * 10)
    assert majority_share(truth, 2) == 0.75 and majority_share(np.array([2, 2, 0]), 3) == pytest.approx(2 / 3)
    always = chance_test(truth, np.zeros(40, dtype=int), 2, alpha=0.01)
    assert (always.right, always.images, always.chance, always.above) == (30, 40, 0.75, False)
    assert always.reason() == f"no better than chance (accuracy 0.750, chance 0.750, binomial p = {always.p_value:.2g})"
    learned = chance_test(truth, truth, 2, alpha=0.01)  # all 40 right: 0.75**40
    assert learned.p_value == pytest.approx(0.75 ** 40) and learned.above
    entry = learned.document()
    assert set(entry) == {"accuracy_ci95_low", "accuracy_ci95_high", "chance_accuracy", "chance_p_value",
                          "above_chance"}
    assert entry["accuracy_ci95_low"] == pytest.approx(0.025 ** (1 / 40)) and entry["accuracy_ci95_high"] == 1.0


def document(finetune: tuple[int, bool], scratch: tuple[int, bool], n: int = 100) -> dict:
    """A metrics document: each variant's (right, above chance) of ``n`` at chance 0.5."""
    def entry(right: int, above: bool) -> dict:
        low, high = accuracy_interval(right, n)
        return {"accuracy": right / n, "accuracy_ci95_low": low, "accuracy_ci95_high": high,
                "chance_accuracy": 0.5, "chance_p_value": chance_p_value(right, n, 0.5), "above_chance": above}

    return {"finetune": entry(*finetune), "scratch": entry(*scratch),
            "comparison": {"challenger": "finetune", "baseline": "scratch", "test_images": n, "chance_p": 0.01,
                           "delta": {"accuracy": (finetune[0] - scratch[0]) / n},
                           "mcnemar": {"p_value": 1e-6, "discordant": 40, "challenger_only": 40, "baseline_only": 0}}}


def test_a_baseline_at_chance_gets_no_winner_and_no_win_from_mcnemar():
    doc = document((90, True), (50, False))
    line = verdict_line(doc)
    assert line.startswith("scratch did no better than chance (accuracy 0.500, chance 0.500, binomial p = 0.54) "
                           "on 100 test images, so the comparison names no winner")
    assert "beats scratch" not in line and "McNemar" not in line and "unlikely to be luck" not in line
    lines = comparison_lines(doc)
    assert lines[0] == f"**Verdict**: {line}"
    assert "| finetune | 0.900 [0.824, 0.951] | 0.500 | 1.5e-17 | yes |" in lines
    assert any(row.startswith("| scratch | 0.500 [0.398, 0.602] | 0.500 | 0.54 | no |") for row in lines)
    assert lines[-1].endswith("It is no win: scratch did no better than chance, and a difference from a model that "
                              "did not learn says nothing about which way of training is better.")


def test_both_at_chance_says_both_and_names_no_winner():
    line = verdict_line(document((55, False), (50, False)))
    assert line == ("finetune did no better than chance (accuracy 0.550, chance 0.500, binomial p = 0.18) and "
                    "scratch did no better than chance (accuracy 0.500, chance 0.500, binomial p = 0.54) on 100 test "
                    "images: neither learned enough to compare, so there is no winner.")


def test_both_above_chance_names_the_winner_as_before():
    line = verdict_line(document((90, True), (80, True)))
    assert line.startswith("finetune beats scratch on test accuracy: 0.900 vs 0.800")


def run(variant: str, fraction: float, seed: int, right: list[int]) -> dict:
    return {"variant": variant, "fraction": fraction, "seed": seed, "train_images": int(40 * fraction),
            "classes": 2, "test_acc": sum(right) / len(right), "right": right, "val_acc": 0.5, "selected_epoch": 1}


def test_the_study_names_no_winner_where_a_variant_is_at_chance():
    # Fraction 0.5: scratch right on 6 of 10 per seed, 12 of 20 pooled: p = 0.25 against 0.5.
    # Fraction 1: both right on all 10 per seed, 20 of 20: p = 2**-20.
    records = [run("finetune", 0.5, s, [1] * 10) for s in (0, 1)] + [
        run("scratch", 0.5, s, [1] * 6 + [0] * 4) for s in (0, 1)] + [
        run(v, 1.0, s, [1] * 9 + [0] if v == "scratch" else [1] * 10) for v in ("finetune", "scratch") for s in (0, 1)]
    doc = summarize(records, "finetune", "scratch", chance=0.5, alpha=0.01)
    small, large = doc["fractions"]["0.5"], doc["fractions"]["1"]
    assert small["chance"]["scratch"] == {"right": 12, "images": 20, "above_chance": False,
                                          "p_value": pytest.approx(chance_p_value(12, 20, 0.5))}
    assert large["chance"]["finetune"]["p_value"] == pytest.approx(2 ** -20)
    assert large["chance"]["scratch"]["above_chance"]
    assert doc["verdict"] == (
        "fine-tuning wins at every size where both beat chance; the gap is 10 points at 20 images per class "
        "(smallest size compared: McNemar p = 0.5 pooled over 2 seeds). No winner where a model did not learn: "
        "at 10 images per class scratch did no better than chance (accuracy 0.600, chance 0.500, binomial p = 0.25).")
    assert "| 0.25 (at chance) |" in study_markdown(doc)
    nothing = summarize([r for r in records if r["fraction"] == 0.5], "finetune", "scratch", chance=0.5, alpha=0.01)
    assert nothing["verdict"].startswith("No size names a winner: at 10 images per class scratch did no better than "
                                         "chance")


def test_validation_chooses_with_ties_to_the_lower_loss_then_the_challenger():
    scores = {"finetune": {"val_acc": 0.9, "val_loss": 0.3}, "scratch": {"val_acc": 0.9, "val_loss": 0.2}}
    assert choose_by_validation(scores, "finetune") == "scratch"
    scores["scratch"]["val_loss"] = 0.3
    assert choose_by_validation(scores, "finetune") == "finetune"
    assert choose_by_validation(scores, "scratch") == "scratch"
    scores["finetune"]["val_loss"] = None  # an old model.pt without a loss loses the tie
    assert choose_by_validation(scores, "finetune") == "scratch"
    scores["finetune"]["val_acc"] = 0.91
    assert choose_by_validation(scores, "scratch") == "finetune"


def test_the_validation_score_carries_its_uncertainty():
    held_out = validation_uncertainty({"val_acc": 1.0, "val_images": 10})
    assert held_out == {"source": "validation", "images": 10, "ci95": [pytest.approx(0.025 ** 0.1), 1.0]}
    assert uncertainty_words(1.0, held_out) == "1.0000 (95% interval 0.6915–1.0000, 10 validation images)"
    folds = validation_uncertainty({"val_acc": 0.9, "val_source": "cross-validation", "val_acc_sd": 0.03,
                                    "val_folds": 5})
    assert uncertainty_words(0.9, folds) == "0.9000 ± 0.0300 (sd over 5 folds)"
    assert validation_uncertainty({"val_acc": 0.9, "val_loss": 0.1}) is None  # written before these keys
    assert uncertainty_words(0.9, None) == "0.9000 (uncertainty not recorded)"
