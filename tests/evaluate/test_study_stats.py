"""The study's statistics against hand computations, its curve rows, report and verdict."""

from __future__ import annotations

import math

import pytest

from finetune.evaluate.study import crossover, curve_rows, interval, paired_t_p, study_markdown, summarize

T_975_2DF = 4.302653  # Student's t, 97.5th percentile, 2 degrees of freedom (tables)


def run(variant, fraction, seed, right):
    return {"variant": variant, "fraction": fraction, "seed": seed, "train_images": int(40 * fraction),
            "classes": 2, "test_acc": sum(right) / len(right), "right": right, "val_acc": 0.5, "selected_epoch": 1}


# fraction 0.5: finetune 0.8 / 0.9 / 0.7, scratch 0.6 / 0.7 / 0.7 (differences 0.2, 0.2, 0.0)
SMALL = [run("finetune", 0.5, 0, [1] * 8 + [0] * 2), run("scratch", 0.5, 0, [1] * 6 + [0] * 4),
         run("finetune", 0.5, 1, [1] * 9 + [0]), run("scratch", 0.5, 1, [1] * 7 + [0] * 3),
         run("finetune", 0.5, 2, [1] * 7 + [0] * 3), run("scratch", 0.5, 2, [0] + [1] * 7 + [0] * 2)]
# fraction 1.0: finetune 0.9 each, scratch 1.0 / 0.9 / 1.0 (differences -0.1, 0, -0.1)
LARGE = [run("finetune", 1.0, s, [1] * 9 + [0]) for s in range(3)] + [
    run("scratch", 1.0, 0, [1] * 10), run("scratch", 1.0, 1, [1] * 9 + [0]), run("scratch", 1.0, 2, [1] * 10)]


def test_interval_and_paired_test_match_the_hand_computation():
    diff = interval([0.2, 0.2, 0.0])
    se = math.sqrt(((0.2 - 0.4 / 3) ** 2 * 2 + (0.4 / 3) ** 2) / 2) / math.sqrt(3)  # sample sd / sqrt(n)
    assert diff["mean"] == pytest.approx(0.4 / 3)
    assert diff["high"] - diff["mean"] == pytest.approx(T_975_2DF * se, rel=1e-5)
    # t = 0.1333 / 0.0667 = 2 on 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2)
    assert paired_t_p([0.8, 0.9, 0.7], [0.6, 0.7, 0.7]) == pytest.approx(1 - 2 / math.sqrt(6))
    assert interval([0.7]) == {"mean": 0.7, "low": None, "high": None} and paired_t_p([0.7], [0.6]) is None
    assert paired_t_p([0.5, 0.6], [0.5, 0.6]) == 1.0


def test_summary_pools_mcnemar_over_seeds_finds_the_crossover_and_says_it():
    document = summarize(SMALL + LARGE, "finetune", "scratch")
    small, large = document["fractions"]["0.5"], document["fractions"]["1"]
    # Discordant images: seed 0 two for finetune, seed 1 two, seed 2 one each way -> 5 vs 1,
    # two-sided exact binomial p = 2 * (1 + 6) / 2**6.
    assert small["mcnemar"] == {"challenger_only": 5, "baseline_only": 1, "discordant": 6,
                                "p_value": pytest.approx(14 / 64)}
    assert (small["train_images"], small["per_class"], small["seeds"]) == (20, 10, 3)
    assert large["difference"]["mean"] == pytest.approx(-0.2 / 3)
    # The mean gap goes from +0.1333 at 20 images to -0.0667 at 40: zero at 20 + 20 * 2/3.
    assert document["crossover_images"] == pytest.approx(20 + 20 * (0.4 / 3) / (0.6 / 3))
    assert document["verdict"] == ("fine-tuning wins below about 17 images per class and not above it; the gap is "
                                   "13 points at 10 images per class and 7 points at 20 images per class "
                                   "(smallest size: McNemar p = 0.22 pooled over 3 seeds).")
    rows = curve_rows(document)
    assert [r["train_images"] for r in rows] == [20, 40] and rows[0]["finetune"] == pytest.approx(0.8)
    report = study_markdown(document)
    assert report.splitlines()[2] == document["verdict"] and report.count("\n| 0.5 |") == 1


@pytest.mark.parametrize(("gaps", "expected"), [([0.1, 0.05], None), ([-0.1, 0.1], 15.0), ([0.2, -0.2], 15.0)])
def test_crossover_is_where_the_mean_gap_changes_sign(gaps, expected):
    rows = [{"train_images": n, "difference": {"mean": g}} for n, g in zip((10, 20), gaps, strict=True)]
    assert crossover(rows) == expected


def test_a_win_at_every_size_says_so():
    document = summarize(SMALL, "finetune", "scratch")
    assert document["verdict"].startswith("fine-tuning wins at every size tried; the gap is 13 points at 10 images")
