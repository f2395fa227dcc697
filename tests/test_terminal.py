"""A readable terminal: `dvc metrics show` (`make metrics`) prints one row of at most 11 numbers
plus its Path column, and `make dag` a stage a line, in real DVC commands on a copy of the
project's pipeline (dvc.yaml, params.yaml) holding every metrics file a run writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, dvc

from finetune.core.config import load_params
from finetune.dag import WIDTH, parse_dot, render
from finetune.demo.workspace import sync_workspace

MAX_COLUMNS = 12  # Path and 11 numbers
# What the other stages write (finetune/stages/train.py, study_report.py): here only to be left out.
TRAIN = {"val_acc": 0.71, "val_loss": 0.62, "selected_epoch": 10, "epochs_trained": 10, "val_acc_sd": 0.04,
         "val_folds": 2, "val_images": 100, "lr": 6.3e-05, "train_acc": 0.72, "images_per_s": 57.7,
         "train_images": 100}
STUDY = {"enabled": True, "fractions": {"0.5": {"train_images": 50, "finetune": 0.6, "scratch": 0.54,
                                                 "difference": 0.06, "paired_t_p": 0.36, "mcnemar_p": 0.001}},
         "crossover_images": None, "chance_accuracy": 0.5}


def evaluate_document(variants: list[str], challenger: str, baseline: str) -> dict:
    """The evaluate stage's metrics document, made by its own functions from known predictions."""
    from finetune.evaluate.metrics import VariantEval, chance_test, compare, metrics_document, score

    truth, classes = np.array([0, 1] * 20), ["hotdog", "not-hotdog"]
    results = []
    for i, name in enumerate(variants):
        wrong = np.arange(len(truth)) % (i + 3) == 0  # each variant wrong on other images
        predicted = np.where(wrong, 1 - truth, truth)
        probs = np.full((len(truth), 2), 0.2)
        probs[np.arange(len(truth)), predicted] = 0.8
        scores, per_class, confusion = score(probs, truth, classes)
        results.append(VariantEval(name, scores, per_class, confusion, classes, [f"{n}.jpg" for n in range(40)],
                                   probs, truth, chance=chance_test(truth, predicted, 2, 0.01)))
    by_name = {r.name: r for r in results}
    return metrics_document(results, compare(by_name[challenger], by_name[baseline]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of the project with the metrics files of a finished run, the summary written by the
    evaluate stage's own functions (a third variant in the evaluation, which must add no column)."""
    from finetune.ingest.validation import headline
    from finetune.evaluate.metrics import summary_document
    from finetune.stages.evaluate import summary_path

    workspace = sync_workspace(REPO, tmp_path_factory.mktemp("terminal") / "ws", {}, share_cache=False)
    params = load_params(workspace / "params.yaml")
    report = {"passed": True, "files": 500, "used": 498, "quarantined": 2, "failed": [], "warnings": ["dup"]}
    document = evaluate_document([*params.train, "frozen"], params.evaluate.challenger, params.evaluate.baseline)
    files = {params.validate_.metrics: headline(report), params.evaluate.metrics: document,
             params.study.metrics: STUDY, **{Path(f"metrics/train/{v}.json"): TRAIN for v in params.train}}
    for path, content in files.items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_text(json.dumps(content))
    summary = summary_document(document, headline(report))  # what the stage reads from validate.metrics
    (workspace / summary_path(params)).write_text(json.dumps(summary))
    return workspace


def test_dvc_metrics_show_is_one_row_of_at_most_12_columns(workspace):
    params = load_params(workspace / "params.yaml")
    lines = dvc(workspace, "metrics", "show").stdout.splitlines()
    header = lines[0].split()
    assert header[0] == "Path" and len(header) <= MAX_COLUMNS, header
    assert [line.split()[0] for line in lines[1:]] == ["metrics/summary.json"]
    challenger, baseline = params.evaluate.challenger, params.evaluate.baseline
    assert {f"{challenger}.acc", f"{challenger}.ci95_lo", f"{challenger}.ci95_up", f"{baseline}.acc",
            "delta_acc", "mcnemar_p", "validated", "files_used"} <= set(header)
    row = dict(zip(header, lines[1].split(), strict=True))
    assert row["validated"] == "True" and row["files_used"] == "498"


def test_the_other_numbers_are_still_read_by_dvc_metrics_show_with_their_file(workspace):
    params = load_params(workspace / "params.yaml")
    others = [str(params.evaluate.metrics), str(params.validate_.metrics), "metrics/train/finetune.json"]
    shown = json.loads(dvc(workspace, "metrics", "show", "--json", *others).stdout)
    data = next(iter(shown.values()))["data"]
    assert data[str(params.evaluate.metrics)]["data"]["frozen"]["accuracy"] > 0
    assert data[str(params.validate_.metrics)]["data"]["quarantined"] == 2
    assert data["metrics/train/finetune.json"]["data"]["val_acc"] == TRAIN["val_acc"]


def test_make_dag_prints_every_stage_on_a_short_line(workspace):
    done = subprocess.run(["make", "-s", "dag", f"WORKSPACE={workspace}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    stages, _ = parse_dot(dvc(workspace, "dag", "--dot").stdout)
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert lines[0].split() == ["stage", "runs", "after"]
    order = [line.split()[0] for line in lines[1:]]
    assert sorted(order) == sorted(stages)
    after = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    for stage, before in after.items():  # a stage comes after every stage it names
        assert all(order.index(name) < order.index(stage) for name in before.split(", ") if name != "-")
    assert after["fetch"] == "-" and after["register"] == "evaluate"
    assert after["evaluate"] == "train@finetune, train@scratch"  # not fetch, validate: they come through


def test_a_stage_after_many_wraps_within_the_width():
    names = [f"train@variant-number-{i}" for i in range(12)]
    dot = "\n".join(["strict digraph {", *(f'"{n}";' for n in [*names, "evaluate"]),
                     *(f'"{n}" -> "evaluate";' for n in names), "}"])
    lines = render(dot).splitlines()
    assert all(len(line) <= WIDTH for line in lines) and len(lines) > len(names) + 2
    assert all(name in render(dot) for name in names) and lines[-1].startswith(" ")
