"""The study stages end to end on a tiny project: per-seed runs, nested subsets, the report, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from train.test_training import make_project, tiny_train

from finetune.core.config import load_params
from finetune.stages.search import search_variant
from finetune.stages.study import run_seed
from finetune.stages.study_report import report

STUDY = {"study.enabled": True, "study.seeds": [0, 1], "study.fractions": [0.5, 1.0], **tiny_train(epochs=1),
         **{k.replace("train.finetune.", "train.scratch."): v for k, v in tiny_train(epochs=1).items()}}


@pytest.mark.slow
def test_the_study_trains_each_seed_and_fraction_and_reports_the_curve(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p", train=4, test=2, **STUDY)
    params = load_params(project / "params.yaml")
    # What the search stages write (search.enabled: false: each variant's own lr), scratch's as a
    # search that chose 0.005: the study trains each variant with its search's choice.
    for variant in ("finetune", "scratch"):
        search_variant(params, variant, Path(f"metrics/search/{variant}.json"), project)
    chosen = project / "metrics/search/scratch.json"
    chosen.write_text(json.dumps(json.loads(chosen.read_text()) | {
        "enabled": True, "method": "validation", "lr": 0.005, "epochs": 1, "batch_size": 4}))
    seeds = [run_seed(params, seed, Path(f"reports/study/seed-{seed}.json"), project) for seed in (0, 1)]
    runs = [r for s in seeds for r in s["runs"]]
    assert {(r["variant"], r["lr"]) for r in runs} == {("finetune", params.train["finetune"].lr), ("scratch", 0.005)}
    assert [(r["fraction"], r["variant"]) for r in seeds[0]["runs"]] == [
        (0.5, "finetune"), (0.5, "scratch"), (1.0, "finetune"), (1.0, "scratch")]
    # 4 train images per class, 2 held out for validation: 1 and then 2 per class train.
    assert {(r["fraction"], r["train_images"]) for r in runs} == {(0.5, 2), (1.0, 4)}
    assert all(len(r["right"]) == 4 and r["test_acc"] == sum(r["right"]) / 4 for r in runs)
    assert seeds[0]["parent_run"] == seeds[1]["parent_run"]  # one study, whichever seed came first

    # study_report runs in a process of its own: it must find the project's store itself
    mlflow.set_tracking_uri((tmp_path / "elsewhere").as_uri())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # which set_tracking_uri sets: a new process has neither
    document = report(params, project)
    assert set(document["fractions"]) == {"0.5", "1"} and document["fractions"]["1"]["seeds"] == 2
    metrics = json.loads((project / "metrics/study.json").read_text())
    assert metrics["enabled"] is True and set(metrics["fractions"]["1"]) == {
        "train_images", "finetune", "scratch", "difference", "paired_t_p", "mcnemar_p", "finetune_above_chance",
        "scratch_above_chance"}
    # The floor: the test split's largest class's share (2 and 2 test images), each variant's
    # right answers pooled over both seeds (8 images) against it.
    assert metrics["chance_accuracy"] == 0.5
    pooled = document["fractions"]["1"]["chance"]["finetune"]
    assert pooled["images"] == 8 and pooled["right"] == sum(sum(r["right"]) for r in runs
                                                             if r["fraction"] == 1.0 and r["variant"] == "finetune")
    summary = json.loads((project / "plots/study/summary.json").read_text())
    assert summary["verdict"] == document["verdict"]
    curve = pd.read_csv(project / "plots/study/curve.csv")
    assert list(curve["train_images"]) == [2, 4] and {"finetune", "scratch"} <= set(curve.columns)
    assert (project / "plots/study/curve.png").stat().st_size > 0
    assert (project / "reports/study.md").read_text().splitlines()[2] == document["verdict"]

    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(seeds[0]["parent_run"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    # Each training recorded as it trained (one training record): its curves and lrs per epoch,
    # its test accuracy and the kept epoch at the end, in words as its description.
    child = next(c for c in children if c.info.run_name == "finetune 0.5 seed 0")
    assert child.data.params["fraction"] == "0.5" and child.data.params["train_images"] == "2"
    assert {"train_loss", "val_acc", "lr", "test_acc", "selected_epoch"} <= child.data.metrics.keys()
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1]
    (record,) = [r for r in seeds[0]["runs"] if (r["variant"], r["fraction"]) == ("finetune", 0.5)]
    assert child.data.metrics["test_acc"] == record["test_acc"]
    assert child.data.tags["mlflow.note.content"].startswith(f"finetune 0.5 seed 0: test accuracy {record['test_acc']:.3f}")
    assert parent.data.tags["mlflow.note.content"] == document["verdict"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "study")} == {"study/curve.png",
                                                                                    "study/study.md"}


def test_a_disabled_study_trains_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p")
    params = load_params(project / "params.yaml")
    assert run_seed(params, 0, Path("reports/study/seed-0.json"), project)["enabled"] is False
    assert report(params, project) == {"enabled": False}
    assert "no study was run" in (project / "reports/study.md").read_text()
    assert not (project / "mlflow").exists()


def test_the_study_report_tests_each_fraction_against_the_test_splits_chance(tmp_path):
    """study_report on hand-made seed files: chance is the largest test class's share in
    validate.files (3 of 4), and a fraction where a variant is at chance names no winner."""
    from conftest import REPO

    from finetune.demo.workspace import write_params

    project = tmp_path / "p"
    (project / "data" / "validate").mkdir(parents=True)
    write_params(REPO / "params.yaml", project / "params.yaml", {"study.enabled": True, "study.seeds": [0]})
    rows = [{"path": f"test/{c}/{i}.jpg", "split": "test", "class": c} for c, n in (("a", 30), ("b", 10))
            for i in range(n)] + [{"path": "train/a/0.jpg", "split": "train", "class": "a"}]
    pd.DataFrame(rows).to_csv(project / "data" / "validate" / "files.csv", index=False)

    def run(variant: str, fraction: float, right: int) -> dict:
        outcome = [1] * right + [0] * (40 - right)
        return {"seed": 0, "fraction": fraction, "variant": variant, "train_images": int(100 * fraction),
                "classes": 2, "test_acc": right / 40, "right": outcome, "val_acc": 0.9, "selected_epoch": 1}

    # Fraction 0.5: scratch right on 30 of 40, what "always a" scores. Fraction 1: both learned.
    runs = [run("finetune", 0.5, 39), run("scratch", 0.5, 30), run("finetune", 1.0, 40), run("scratch", 1.0, 38)]
    (project / "reports" / "study").mkdir(parents=True)
    (project / "reports" / "study" / "seed-0.json").write_text(json.dumps({"enabled": True, "runs": runs}))
    document = report(load_params(project / "params.yaml"), project)
    assert document["fractions"]["0.5"]["chance"]["accuracy"] == 0.75
    assert document["fractions"]["0.5"]["chance"]["scratch"]["above_chance"] is False
    assert "at 25 images per class scratch did no better than chance (accuracy 0.750, chance 0.750" in document["verdict"]
    assert document["verdict"].startswith("fine-tuning wins at every size where both beat chance")
    metrics = json.loads((project / "metrics/study.json").read_text())
    assert metrics["chance_accuracy"] == 0.75 and metrics["fractions"]["0.5"]["scratch_above_chance"] is False
