"""The evaluate report's one-sentence verdict, and that the report and the flow's artifact open with it."""

from __future__ import annotations

import pytest

from finetune.evaluate.report import comparison_lines, verdict_line


def document(finetune: float, scratch: float, p: float, n: int = 400) -> dict:
    return {"finetune": {"accuracy": finetune}, "scratch": {"accuracy": scratch},
            "comparison": {"challenger": "finetune", "baseline": "scratch", "test_images": n,
                           "delta": {"accuracy": finetune - scratch},
                           "mcnemar": {"p_value": p, "discordant": 10, "challenger_only": 8, "baseline_only": 2}}}


@pytest.mark.parametrize(("finetune", "scratch", "p", "expected"), [
    (0.939, 0.843, 0.0001, "finetune beats scratch on test accuracy: 0.939 vs 0.843 (+9.6 points on 400 test "
                           "images); McNemar p = 0.0001, unlikely to be luck."),
    (0.60, 0.65, 0.03, "scratch beats finetune on test accuracy: 0.600 vs 0.650 (-5.0 points on 400 test images); "
                       "McNemar p = 0.03, probably not luck."),
    (0.7, 0.7, 1.0, "finetune and scratch tie on test accuracy: 0.700 vs 0.700 (+0.0 points on 400 test images); "
                    "McNemar p = 1, could be luck: more test data would tell."),
])
def test_the_verdict_names_the_winner_the_gap_and_the_evidence(finetune, scratch, p, expected):
    assert verdict_line(document(finetune, scratch, p)) == expected


def test_the_comparison_opens_with_the_verdict():
    """The report's comparison starts with the bold verdict sentence, then the metrics table with
    its delta, and ends with the McNemar sentence (no chance table: the document has no floor)."""
    assert comparison_lines(document(0.9, 0.8, 0.001)) == [
        "**Verdict**: finetune beats scratch on test accuracy: 0.900 vs 0.800 (+10.0 points on 400 test images); "
        "McNemar p = 0.001, unlikely to be luck.",
        "",
        "| metric | finetune | scratch | delta (finetune − scratch) |",
        "|---|---|---|---|",
        "| accuracy | 0.9000 | 0.8000 | +0.1000 |",
        "",
        "",
        "**McNemar (exact)**: of 400 test images the models disagree on 10; only finetune is right on 8, only "
        "scratch on 2. p = 0.001: the difference is unlikely to be luck (p < 0.05).",
    ]
