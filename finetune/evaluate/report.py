"""The comparison in Markdown: one source for the evaluate stage's report and the pipeline's
Prefect artifact. Everything is read from the evaluate stage's metrics document (see
``metrics_document``), so it needs neither torch nor the models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.evaluate.metrics import HEADLINE, VariantEval, chance_words


def variants(document: dict) -> list[str]:
    """The variants of a metrics document, in the order they were evaluated."""
    return [name for name in document if name != "comparison"]


def test_images(document: dict) -> int:
    """How many test images the variants were scored on."""
    return int(document["comparison"]["test_images"])


def at_chance(document: dict) -> list[str]:
    """The compared variants (challenger first) whose test accuracy is no better than chance; an
    entry written before the floor existed (no ``above_chance``) counts as tested and passed."""
    comparison = document["comparison"]
    return [name for name in (comparison["challenger"], comparison["baseline"])
            if not document[name].get("above_chance", True)]


def chance_clause(name: str, entry: dict) -> str:
    """``scratch did no better than chance (accuracy 0.500, chance 0.500, binomial p = 0.54)``."""
    return f"{name} did {chance_words(entry['accuracy'], entry['chance_accuracy'], entry['chance_p_value'])}"


def verdict_line(document: dict) -> str:
    """The comparison in one sentence: who scores higher on test accuracy, by how much, on how
    many images, and whether the exact McNemar test says it could be luck. When a compared
    variant did no better than chance (the majority class's share), it says so instead and names
    no winner: beating a model that did not learn shows nothing. The one verdict of the report,
    the Prefect artifact and the MLflow parent run's description."""
    failed = at_chance(document)
    if failed:
        return chance_verdict(document, failed)
    comparison = document["comparison"]
    challenger, baseline = comparison["challenger"], comparison["baseline"]
    delta, p = comparison["delta"]["accuracy"], comparison["mcnemar"]["p_value"]
    if delta == 0:
        lead = f"{challenger} and {baseline} tie on test accuracy"
    else:
        first, second = (challenger, baseline) if delta > 0 else (baseline, challenger)
        lead = f"{first} beats {second} on test accuracy"
    luck = ("unlikely to be luck" if p < 0.01 else "probably not luck" if p < 0.05
            else "could be luck: more test data would tell")
    return (f"{lead}: {document[challenger]['accuracy']:.3f} vs {document[baseline]['accuracy']:.3f} "
            f"({delta * 100:+.1f} points on {test_images(document)} test images); McNemar p = {p:.2g}, {luck}.")


def chance_verdict(document: dict, failed: list[str]) -> str:
    """The verdict when ``failed`` (one or both compared variants) did no better than chance."""
    comparison, n = document["comparison"], test_images(document)
    clauses = " and ".join(chance_clause(name, document[name]) for name in failed)
    if len(failed) == 2:
        return f"{clauses} on {n} test images: neither learned enough to compare, so there is no winner."
    other = next(name for name in (comparison["challenger"], comparison["baseline"]) if name not in failed)
    entry = document[other]
    return (f"{clauses} on {n} test images, so the comparison names no winner: {other}'s "
            f"{entry['accuracy']:.3f} beats chance (binomial p = {entry['chance_p_value']:.2g}), but beating a "
            f"model that did not learn shows nothing about {other} against a working {failed[0]}.")


def comparison_lines(document: dict) -> list[str]:
    """The verdict, the metrics table with deltas, each variant against chance, then the McNemar
    sentence."""
    return [f"**Verdict**: {verdict_line(document)}", "", *metrics_table(document), "", *chance_table(document), "",
            mcnemar_sentence(document["comparison"], test_images(document), at_chance(document))]


def chance_table(document: dict) -> list[str]:
    """Each variant's test accuracy with its exact 95% interval and its one-sided binomial test
    against the majority class's share (nothing for a document written before the floor)."""
    names = [name for name in variants(document) if "chance_p_value" in document[name]]
    if not names:
        return []
    level = document["comparison"].get("chance_p")
    rows = [f"| variant | test accuracy [95% interval] | chance (majority class) | binomial p (one-sided) | "
            f"better than chance{f' (p < {level:g})' if level else ''} |", "|---|---|---|---|---|"]
    for name in names:
        e = document[name]
        low, high = e["accuracy_ci95_low"], e["accuracy_ci95_high"]
        rows.append(f"| {name} | {e['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {e['chance_accuracy']:.3f} | "
                    f"{e['chance_p_value']:.2g} | {'yes' if e['above_chance'] else 'no'} |")
    return rows + ["", "The interval is exact (Clopper-Pearson). Chance is the accuracy of always answering the "
                   "test split's largest class; the exact binomial test asks how often guessing at that rate "
                   "would score this well."]


def evaluation_markdown(document: dict, results: list[VariantEval], dataset: Path, figures: dict[str, Path],
                        base: Path) -> str:
    """The evaluate stage's report: the comparison, per-class metrics, confusion matrices, the
    MLflow runs and the pictures (linked relative to ``base``, the report's folder)."""
    comparison = document["comparison"]
    classes = results[0].classes
    lines = [f"# {comparison['challenger']} vs {comparison['baseline']} on {dataset} "
             f"({test_images(document)} test images, {len(classes)} classes)", "",
             *comparison_lines(document), "", "## Per class", "", *per_class_table({r.name: r.per_class for r in results}, classes), "",
             "## Confusion matrices (rows: true, columns: predicted)"]
    for r in results:
        lines += ["", f"**{r.name}**", "", *confusion_table(r.classes, r.confusion)]
    lines += ["", "## Runs", ""] + [f"- {r.name}: MLflow run `{r.run_id}`" for r in results]
    lines += ["", "## Pictures", ""] + [f"![{name}]({os.path.relpath(path, base)})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def metrics_table(document: dict) -> list[str]:
    """One row per headline metric: each variant's value and the challenger − baseline delta."""
    comparison, names = document["comparison"], variants(document)
    rows = [f"| metric | {' | '.join(names)} | delta ({comparison['challenger']} − {comparison['baseline']}) |",
            "|---" * (len(names) + 2) + "|"]
    for metric in HEADLINE:
        if metric in comparison["delta"]:
            values = " | ".join(f"{document[name][metric]:.4f}" for name in names)
            rows.append(f"| {metric} | {values} | {comparison['delta'][metric]:+.4f} |")
    return rows


def mcnemar_sentence(comparison: dict, n: int, failed: list[str] = ()) -> str:
    """The exact McNemar test in words: the discordant images and what the p-value says; with
    ``failed`` (variants at chance), that the test compares against a model that did not learn."""
    test = comparison["mcnemar"]
    verdict = ("is unlikely to be luck (p < 0.05)" if test["p_value"] < 0.05
               else "could be luck (p ≥ 0.05): more test data would tell")
    sentence = (f"**McNemar (exact)**: of {n} test images the models disagree on {test['discordant']}; "
                f"only {comparison['challenger']} is right on {test['challenger_only']}, only "
                f"{comparison['baseline']} on {test['baseline_only']}. p = {test['p_value']:.4g}: the difference "
                f"{verdict}.")
    if failed:
        sentence += (f" It is no win: {' and '.join(failed)} did no better than chance, and a difference from a "
                     "model that did not learn says nothing about which way of training is better.")
    return sentence


def per_class_table(per_class: dict, classes: list[str]) -> list[str]:
    """Precision / recall / F1 of each variant (``per_class``: variant -> class -> values), one
    row per class."""
    names = list(per_class)
    rows = ["| class | support | " + " | ".join(f"{name} precision / recall / F1" for name in names) + " |",
            "|---" * (len(names) + 2) + "|"]
    for cls in classes:
        cells = [per_class[name][cls] for name in names]
        text = [f"{c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f}" for c in cells]
        rows.append(f"| {cls} | {cells[0]['support']} | " + " | ".join(text) + " |")
    return rows


def confusion_table(classes: list[str], matrix: list[list[int]]) -> list[str]:
    """A confusion matrix as a Markdown table (rows: true class, columns: predicted)."""
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(str(c) for c in row) + " |" for name, row in zip(classes, matrix, strict=True)]
    return rows


def study_verdict(params, project: Path) -> str | None:
    """The study's verdict (the study_report stage's ``<study.plots>/summary.json``) when
    ``params`` enable the study and it ran, else None."""
    summary = project / params.study.plots / "summary.json"
    if not params.study.enabled or not summary.exists():
        return None
    return json.loads(summary.read_text()).get("verdict")
