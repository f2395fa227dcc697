"""The evaluate stage: metrics checked against hand computation, the exact McNemar test, and the
stage's files (dvc metrics JSON, dvc plots data, PNGs, Markdown) from real models on real images."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from models import CLASSES, params, project_with_data, save_variant

from finetune.evaluate.figures import misclassified
from finetune.evaluate.metrics import better, mcnemar, score, winner
from finetune.evaluate.report import verdict_line
from finetune.stages.evaluate import EvalPaths, run_evaluate


def test_score_matches_hand_computation_for_two_classes():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    truth = np.array([0, 0, 1, 1])  # the last one is wrong
    headline, per_class, confusion = score(probs, truth, CLASSES)
    assert headline["accuracy"] == 0.75
    assert confusion == [[2, 0], [1, 1]]
    assert per_class["hotdog"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert per_class["not-hotdog"]["recall"] == 0.5 and per_class["not-hotdog"]["precision"] == 1.0
    assert headline["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert headline["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.7, 0.2])))
    # positives (class 1) scored 0.7 and 0.2; negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert headline["roc_auc"] == pytest.approx(0.75)


@pytest.mark.parametrize("classes", [3, 7])
def test_score_with_many_classes_uses_macro_averages_and_no_auc(classes):
    rng = np.random.default_rng(classes)
    probs = rng.dirichlet(np.ones(classes), size=40)
    truth = rng.integers(0, classes, size=40)
    headline, per_class, confusion = score(probs, truth, [f"c{i}" for i in range(classes)])
    assert "roc_auc" not in headline
    assert headline["recall"] == pytest.approx(np.mean([v["recall"] for v in per_class.values()]))
    assert np.trace(confusion) == int((probs.argmax(1) == truth).sum())
    assert sum(map(sum, confusion)) == 40


@pytest.mark.parametrize(("b", "c"), [(10, 0), (7, 3), (5, 5), (0, 0), (1, 12)])
def test_mcnemar_exact_p_value(b, c):
    right_a = np.array([True] * b + [False] * c + [True] * 4 + [False] * 2)
    right_b = np.array([False] * b + [True] * c + [True] * 4 + [False] * 2)
    test = mcnemar(right_a, right_b)
    n = b + c
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
    assert test == {"challenger_only": b, "baseline_only": c, "discordant": n, "p_value": pytest.approx(expected)}


def test_better_and_winner_respect_the_metric_direction():
    assert better("accuracy", 0.9, 0.8) == pytest.approx(0.1)
    assert better("log_loss", 0.2, 0.5) == pytest.approx(0.3)
    document = {"finetune": {"accuracy": 0.8, "log_loss": 0.9}, "scratch": {"accuracy": 0.7, "log_loss": 0.4},
                "comparison": {}}
    assert winner(document, "accuracy", "scratch") == "finetune"
    assert winner(document, "log_loss", "finetune") == "scratch"
    tie = {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}}
    assert winner(tie, "accuracy", "b") == "b" and winner(tie, "accuracy", "a") == "a"


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A project whose fine-tuned model always says hotdog and whose scratch model never does,
    on 3 hot dogs and 1 other test image; after the evaluate stage."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = project_with_data(tmp_path / "p", {"hotdog": 3, "not-hotdog": 1})
    save_variant(project, "finetune", favour=0, tag="ft")
    save_variant(project, "scratch", favour=1, tag="sc")
    history = project / "plots" / "train"
    history.mkdir(parents=True)
    for variant in ("finetune", "scratch"):
        pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "test_acc": [0.5, 0.75]}).to_csv(
            history / f"{variant}.csv", index=False)
    results, comparison = run_evaluate(params(project), EvalPaths(project / "models", history), project)
    return project, results, comparison


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_plots_and_report(evaluated):
    project, results, comparison = evaluated
    cfg = params(project).evaluate
    document = json.loads((project / cfg.metrics).read_text())
    assert document["finetune"]["accuracy"] == 0.75 and document["scratch"]["accuracy"] == 0.25
    assert document["comparison"]["delta"]["accuracy"] == pytest.approx(0.5)
    # 4 discordant images: 3 only the fine-tuned model gets right, 1 only scratch: p = 2 * 5/16
    assert document["comparison"]["mcnemar"] == {"challenger_only": 3, "baseline_only": 1, "discordant": 4,
                                                 "p_value": pytest.approx(0.625)}
    # dvc metrics show gets the headline numbers; the per-class detail is beside the plots
    assert document["comparison"]["test_images"] == 4 and "per_class" not in document["finetune"]
    plots = project / cfg.plots
    assert json.loads((plots / "per_class.json").read_text())["finetune"]["not-hotdog"]["recall"] == 0.0
    confusion = pd.read_csv(plots / "predictions_finetune.csv")
    assert list(confusion["predicted"]) == ["hotdog"] * 4
    assert sorted(confusion["actual"]) == ["hotdog"] * 3 + ["not-hotdog"]
    assert set(pd.read_csv(plots / "roc_scratch.csv").columns) == {"fpr", "tpr", "threshold"}
    for name in ("curves", "roc", "confusion_finetune", "confusion_scratch", "errors_finetune", "errors_scratch"):
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (project / cfg.report).read_text()
    assert "| accuracy | 0.7500 | 0.2500 | +0.5000 |" in report
    assert "p = 0.625" in report and "could be luck" in report
    # Both models give one class for every image: chance (3 of 4 is what "always hotdog" scores).
    # One-sided exact binomial: 3 or more of 4 at 0.75, and 1 or more of 4 at 0.75.
    assert document["finetune"]["chance_accuracy"] == 0.75 and document["scratch"]["chance_accuracy"] == 0.75
    assert document["finetune"]["chance_p_value"] == pytest.approx(0.75 ** 4 + 4 * 0.75 ** 3 * 0.25)
    assert document["scratch"]["chance_p_value"] == pytest.approx(1 - 0.25 ** 4)
    assert document["finetune"]["above_chance"] is False and document["scratch"]["above_chance"] is False
    assert document["finetune"]["accuracy_ci95_low"] == pytest.approx(0.1941, abs=1e-4)  # Clopper-Pearson, 3 of 4
    assert document["comparison"]["chance_p"] == 0.01
    assert report.startswith(f"# finetune vs scratch on data/hotdog (4 test images, 2 classes)\n\n**Verdict**: "
                             f"{verdict_line(document)}")
    assert "finetune did no better than chance (accuracy 0.750, chance 0.750, binomial p = 0.74) and scratch did " \
           "no better than chance (accuracy 0.250, chance 0.750, binomial p = 1)" in report
    assert "no winner" in report and "beats" not in report
    assert "| finetune | 0.750 [0.194, 0.994] | 0.750 | 0.74 | no |" in report
    assert "](../plots/evaluate/errors_finetune.png)" in report


@pytest.mark.slow
def test_evaluation_is_logged_to_the_parent_and_variant_runs(evaluated):
    from mlflow.tracking import MlflowClient

    project, results, _ = evaluated
    client = MlflowClient()
    run = client.get_run(results[0].run_id)
    assert run.data.metrics["eval_accuracy"] == 0.75
    parent = run.data.tags["mlflow.parentRunId"]
    logged = client.get_run(parent).data.metrics
    assert logged["finetune.accuracy"] == 0.75 and logged["delta.accuracy"] == pytest.approx(0.5)
    assert logged["mcnemar_p_value"] == pytest.approx(0.625)
    document = json.loads((project / params(project).evaluate.metrics).read_text())
    assert client.get_run(parent).data.tags["mlflow.note.content"] == verdict_line(document)  # the report's own
    assert "did no better than chance" in verdict_line(document)
    assert logged["finetune.chance_p_value"] == pytest.approx(document["finetune"]["chance_p_value"])
    names = {a.path for a in client.list_artifacts(parent, "evaluation")}
    assert {"evaluation/evaluate.md", "evaluation/evaluate.json", "evaluation/confusion_finetune.png"} <= names


def test_misclassified_are_ordered_most_confident_first():
    from finetune.evaluate.metrics import VariantEval

    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    truth = np.array([1, 0, 1, 1])  # wrong: 0 (0.9), 1 (0.6), 3 (0.7)
    result = VariantEval("m", {}, {}, [], CLASSES, ["a", "b", "c", "d"], probs, truth)
    assert misclassified(result, 10) == [0, 3, 1]
    assert misclassified(result, 2) == [0, 3]


def test_evaluate_refuses_models_of_other_classes(tmp_path, monkeypatch):
    from finetune.core.errors import FinetuneError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = project_with_data(tmp_path / "p", {"hotdog": 1, "not-hotdog": 1})
    save_variant(project, "finetune", favour=0, tag="ft")
    save_variant(project, "scratch", favour=0, tag="sc")
    files = project / "data" / "validate" / "files.csv"
    frame = pd.read_csv(files)
    frame["class"] = frame["class"].replace({"not-hotdog": "pizza"})
    frame.to_csv(files, index=False)
    with pytest.raises(FinetuneError, match="trained on classes"):
        run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    assert not (project / params(project).evaluate.metrics).exists()


def test_a_model_that_scores_nan_is_a_clear_error_and_leaves_the_outputs(tmp_path, monkeypatch):
    import torch

    from finetune.core.errors import FinetuneError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = project_with_data(tmp_path / "p", {"hotdog": 2, "not-hotdog": 2})
    save_variant(project, "finetune", favour=0, tag="ft")
    path = save_variant(project, "scratch", favour=1, tag="sc")
    final = torch.load(path, weights_only=False)
    final["model"]["fc.bias"] = torch.full_like(final["model"]["fc.bias"], float("nan"))  # a diverged training
    torch.save(final, path)
    with pytest.raises(FinetuneError, match=r"scratch: its model gives no valid probabilities .* for 4 of 4 test "
                                            r"images.*dvc repro train@scratch"):
        run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    assert not (project / params(project).evaluate.metrics).exists()
