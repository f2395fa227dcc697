"""The study's answer to "when does fine-tuning win?": statistics over seeds per train-set size,
the learning curve and its one-sentence verdict. Plain numbers in, plain numbers out (no torch).

A record is one training of one variant: ``{"seed", "fraction", "variant", "train_images",
"classes", "test_acc", "val_acc", "selected_epoch", "right": [0/1 per test image, in order]}``.
Per fraction: each variant's mean test accuracy with a 95% t-interval over seeds, the paired
difference (challenger − baseline, seed by seed) with its interval, a paired t-test across
seeds, the exact McNemar test on the test images pooled over seeds, and each variant against
chance: the exact one-sided binomial test of its right answers pooled over seeds (``right``
counts them) against the majority class's share of the test split. A fraction where a variant
did no better than chance names no winner, and no crossover passes through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from finetune.evaluate.metrics import chance_p_value, chance_words, mcnemar

CONFIDENCE = 0.95


def interval(values: Sequence[float]) -> dict:
    """Mean and the two-sided 95% t-interval of ``values`` (None bounds for a single value)."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def paired_t_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test of a − b (None below two pairs; 1.0 when every
    difference is the same zero, NaN-free)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) < 2:
        return None
    if np.allclose(diff, diff[0]):
        return 1.0 if diff[0] == 0 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def pooled_chance(right: np.ndarray, chance: float, alpha: float) -> dict:
    """Right answers pooled over seeds against chance: ``{"right", "images", "p_value",
    "above_chance"}`` (the exact one-sided binomial test; p below ``alpha`` is above chance)."""
    p_value = chance_p_value(int(right.sum()), len(right), chance)
    return {"right": int(right.sum()), "images": len(right), "p_value": p_value, "above_chance": p_value < alpha}


def fraction_row(records: list[dict], challenger: str, baseline: str, chance: float | None = None,
                 alpha: float = 0.01) -> dict:
    """The statistics of one fraction (records of every seed, both variants); with ``chance``
    (the majority class's share of the test split), each variant's pooled test against it."""
    by = {(r["variant"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records if (challenger, r["seed"]) in by and (baseline, r["seed"]) in by})
    ch = [by[challenger, s]["test_acc"] for s in seeds]
    bl = [by[baseline, s]["test_acc"] for s in seeds]
    right = {v: np.concatenate([np.asarray(by[v, s]["right"], dtype=bool) for s in seeds]) for v in (challenger, baseline)}
    first = by[challenger, seeds[0]]
    return {"train_images": int(round(np.mean([by[challenger, s]["train_images"] for s in seeds]))),
            "per_class": int(round(np.mean([by[challenger, s]["train_images"] for s in seeds]) / first["classes"])),
            "seeds": len(seeds), challenger: interval(ch), baseline: interval(bl),
            "difference": interval([c - b for c, b in zip(ch, bl, strict=True)]),
            "paired_t_p": paired_t_p(ch, bl), "mcnemar": mcnemar(right[challenger], right[baseline]),
            **({"chance": {"accuracy": chance} | {v: pooled_chance(right[v], chance, alpha) for v in right}}
               if chance is not None else {})}


def summarize(records: list[dict], challenger: str, baseline: str, chance: float | None = None,
              alpha: float = 0.01) -> dict:
    """The study's metrics document: one row per fraction, the crossover (between fractions where
    both variants beat chance), the verdict. ``chance``: the majority class's share of the test
    split (None: no floor); ``alpha``: evaluate.chance_p."""
    fractions = sorted({r["fraction"] for r in records})
    rows = {f"{f:g}": fraction_row([r for r in records if r["fraction"] == f], challenger, baseline, chance, alpha)
            for f in fractions}
    document = {"challenger": challenger, "baseline": baseline, "fractions": rows,
                "crossover_images": crossover([r for r in rows.values() if not at_chance(r, challenger, baseline)])}
    document["verdict"] = verdict(document)
    return document


def crossover(rows: list[dict]) -> float | None:
    """The train-set size where the mean difference changes sign (linear between the two sizes
    around it; the first such place), or None when one variant leads at every size."""
    for a, b in zip(rows, rows[1:], strict=False):
        da, db = a["difference"]["mean"], b["difference"]["mean"]
        if da * db < 0:
            return a["train_images"] + (b["train_images"] - a["train_images"]) * da / (da - db)
    return None


def at_chance(row: dict, challenger: str, baseline: str) -> list[str]:
    """The variants that did no better than chance at this fraction (none without a floor)."""
    tests = row.get("chance", {})
    return [v for v in (challenger, baseline) if v in tests and not tests[v]["above_chance"]]


def chance_note(row: dict, failed: list[str]) -> str:
    """``at 2 images per class scratch did no better than chance (accuracy 0.510, chance 0.500,
    binomial p = 0.37)``, each failed variant named (accuracy pooled over seeds)."""
    tests = row["chance"]
    words = {v: chance_words(tests[v]["right"] / tests[v]["images"], tests["accuracy"], tests[v]["p_value"])
             for v in failed}
    clauses = [f"{v} did {words[v]}" for v in failed]
    return f"at {row['per_class']} images per class " + " and ".join(clauses)


def verdict(document: dict) -> str:
    """One sentence: who wins at which sizes, and by how much at the smallest and largest; sizes
    where a variant did no better than chance are named as such and never counted as a win."""
    ch, bl, rows = document["challenger"], document["baseline"], list(document["fractions"].values())
    notes = [chance_note(r, failed) for r in rows if (failed := at_chance(r, ch, bl))]
    fair = [r for r in rows if not at_chance(r, ch, bl)]
    if not fair:
        return f"No size names a winner: {'; '.join(notes)}."
    sentence = fair_verdict(document, fair, tried="tried" if not notes else "where both beat chance")
    return sentence + (f" No winner where a model did not learn: {'; '.join(notes)}." if notes else "")


def fair_verdict(document: dict, rows: list[dict], tried: str) -> str:
    """The verdict over ``rows`` (the fractions where both variants beat chance)."""
    ch = document["challenger"]
    name = "fine-tuning" if ch == "finetune" else ch
    gaps = [r["difference"]["mean"] for r in rows]
    first, last = rows[0], rows[-1]

    def points(row: dict) -> str:
        return f"{abs(row['difference']['mean']) * 100:.0f} points at {row['per_class']} images per class"

    if all(g > 0 for g in gaps):
        head = f"{name} wins at every size {tried}"
    elif all(g < 0 for g in gaps):
        head = f"{name} loses at every size {tried}"
    elif document["crossover_images"] is not None:
        size = document["crossover_images"] / max(1, first["train_images"] / max(1, first["per_class"]))
        leader = "wins" if gaps[0] > 0 else "loses"
        head = f"{name} {leader} below about {size:.0f} images per class and not above it"
    else:
        head = f"{name} and {document['baseline']} tie at some sizes"
    tail = points(first) if len(rows) == 1 else f"{points(first)} and {points(last)}"
    pooled = first["mcnemar"]["p_value"]
    smallest = "smallest size" if first is next(iter(document["fractions"].values())) else "smallest size compared"
    return (f"{head}; the gap is {tail} ({smallest}: McNemar p = {pooled:.2g} pooled over "
            f"{first['seeds']} seed{'s' if first['seeds'] != 1 else ''}).")


def headline(document: dict) -> dict:
    """What `dvc metrics show` prints of the study: per fraction the train images, each
    variant's mean test accuracy, the mean difference, both p-values and (with a floor) whether
    each variant beat chance; the crossover and the chance accuracy."""
    ch, bl = document["challenger"], document["baseline"]
    rows = {}
    for fraction, row in document["fractions"].items():
        rows[fraction] = {"train_images": row["train_images"], ch: row[ch]["mean"], bl: row[bl]["mean"],
                          "difference": row["difference"]["mean"], "paired_t_p": row["paired_t_p"],
                          "mcnemar_p": row["mcnemar"]["p_value"]}
        if "chance" in row:
            rows[fraction] |= {f"{v}_above_chance": row["chance"][v]["above_chance"] for v in (ch, bl)}
    chance = next(iter(document["fractions"].values())).get("chance", {}).get("accuracy")
    return {"fractions": rows, "crossover_images": document["crossover_images"]} | (
        {"chance_accuracy": chance} if chance is not None else {})


def curve_rows(document: dict) -> list[dict]:
    """The learning curve as rows (dvc plots data): train images, each variant's mean and interval."""
    ch, bl = document["challenger"], document["baseline"]
    rows = []
    for fraction, row in document["fractions"].items():
        entry = {"fraction": float(fraction), "train_images": row["train_images"]}
        for variant in (ch, bl):
            entry |= {variant: row[variant]["mean"], f"{variant}_low": row[variant]["low"],
                      f"{variant}_high": row[variant]["high"]}
        rows.append(entry)
    return rows


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def study_markdown(document: dict) -> str:
    """The study report: the verdict first, then one table row per fraction (with a floor, each
    variant's pooled binomial p against chance)."""
    ch, bl = document["challenger"], document["baseline"]
    first = next(iter(document["fractions"].values()))
    floor = "chance" in first
    extra = f" {ch} vs chance p | {bl} vs chance p |" if floor else ""
    lines = [f"# When does {ch} beat {bl}?", "", document["verdict"], "",
             f"| fraction | train images (per class) | {ch} | {bl} | difference | paired t-test p | "
             f"McNemar p (pooled) |{extra}", "|---" * (7 + 2 * floor) + "|"]
    for fraction, row in document["fractions"].items():
        def cell(stat: dict) -> str:
            return f"{_number(stat['mean'])} [{_number(stat['low'])}, {_number(stat['high'])}]"

        def against(variant: str) -> str:
            test = row["chance"][variant]
            return f"{test['p_value']:.2g}{'' if test['above_chance'] else ' (at chance)'}"

        lines.append(f"| {fraction} | {row['train_images']} ({row['per_class']}) | {cell(row[ch])} | {cell(row[bl])} | "
                     f"{cell(row['difference'])} | {_number(row['paired_t_p'], 4)} | "
                     f"{row['mcnemar']['p_value']:.4g} ({row['mcnemar']['discordant']} discordant) |"
                     + (f" {against(ch)} | {against(bl)} |" if floor else ""))
    lines += ["", f"Test accuracy: mean over {first['seeds']} seed(s) with its "
              "95% t-interval; the difference is paired seed by seed. Each seed draws its own validation split "
              "and nested subsets (a smaller fraction lies inside a larger one). Validation chose each run's "
              "epoch; the test split only scored it."]
    if floor:
        lines.append(f"Chance is {first['chance']['accuracy']:.3f}, the test split's largest class's share; \"vs "
                     "chance p\" is the exact one-sided binomial test of the right answers pooled over seeds. A "
                     "fraction where a variant is at chance names no winner.")
    if document["crossover_images"] is not None:
        lines.append(f"The curves cross at about {document['crossover_images']:.0f} train images.")
    return "\n".join(lines) + "\n"
