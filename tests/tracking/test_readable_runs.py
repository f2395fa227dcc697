"""MLflow that a person reads at a glance: Machine-learning experiments with descriptions, a
parent run that spans the pipeline and carries the comparison, learning rates named by group,
only training settings as params, device tags of the device used, one-line run descriptions,
the registry's bookkeeping in its own experiment, and a logged model that loads on any device.

Real parts: tiny trainings of both variants on real JPEGs, the evaluate and register stages'
functions, a SQLite MLflow store under a temporary folder.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import REPO
from images import write_dataset
from mlflow.tracking import MlflowClient

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN, PIPELINE_START
from finetune.demo.workspace import write_params
from finetune.evaluate.report import verdict_line
from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.stages.train import Paths, train_variant
from finetune.tracking.registry import LOG_FILE, LOG_TAG, promote, promotion_log, register_candidate
from finetune.tracking.serving import load_served
from finetune.tracking.store import (
    KIND_TAG,
    ML_KIND,
    NOTE_TAG,
    REGISTRY_EXPERIMENT,
    close_pipeline_run,
    parent_run,
    pipeline_experiment,
    pipeline_experiment_name,
    runtime_tags,
    use_store,
)
from finetune.tracking.views import pipeline_links

# evaluate.chance_p: 4 test images can never beat chance at 0.01 (conftest's TINY_DATA says why);
# these tests read MLflow's records of a run that registers and promotes.
TINY = {"model.weights": "none", "model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32,
        "evaluate.workers": 0, "evaluate.chance_p": 0.99}
TRAIN = {"epochs": 2, "batch_size": 4, "max_steps": 2, "workers": 0, "precision": "fp32", "val_fraction": 0.5}
KEY = "flow-run-readable"  # what the Prefect flow passes as FINETUNE_PIPELINE_RUN
STARTED_AGO_MS = 90_000  # the pipeline started this long before the first training (fetch, validate, ...)
DATA_HASH = "0123456789abcdef0123456789abcdef.dir"  # the fetch stage's output as dvc.lock records it


def make_project(root: Path) -> Path:
    """params.yaml with tiny trainings of both variants, real JPEGs, their validated file list."""
    settings = TINY | {f"train.{v}.{k}": value for v in ("finetune", "scratch") for k, value in TRAIN.items()}
    root.mkdir(parents=True)
    write_params(REPO / "params.yaml", root / "params.yaml",
                 settings | {"register.model_name": f"clf-{root.parent.name}"})
    dataset = write_dataset(root / "data" / "hotdog", train=4, test=2)
    rows = [{"path": p.relative_to(dataset).as_posix(), "split": p.parts[-3], "class": p.parts[-2]}
            for p in sorted(dataset.rglob("*.jpg"))]
    (root / "data" / "validate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "validate" / "files.csv", index=False)
    (root / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  fetch:\n    cmd: python -m finetune.stages.fetch\n"
                                   f"    outs:\n    - path: data/hotdog\n      md5: {DATA_HASH}\n")
    return root


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One pipeline run as the Prefect flow makes it: both trainings, evaluate, register, the
    gate, the flow's end. Yields (project, {variant: run id}, the pipeline's start in ms)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = make_project(tmp_path_factory.mktemp("readable") / "p")
        patch.chdir(project)
        started = int(time.time() * 1000) - STARTED_AGO_MS
        patch.setenv(PIPELINE_RUN, KEY)
        patch.setenv(PIPELINE_START, str(started))
        params = load_params(project / "params.yaml")
        runs = {}
        for variant in ("finetune", "scratch"):
            paths = Paths(Path(f"models/{variant}"), Path(f"metrics/train/{variant}.json"),
                          Path(f"plots/train/{variant}.csv"))
            runs[variant] = train_variant(params, variant, paths, project).run_id
        run_evaluate(params, EvalPaths(project / "models", project / "plots" / "train"), project)
        registration = register_candidate(params, Path("models"), project)
        decision = promote(params, project)
        close_pipeline_run(project, params.data.dir, KEY, f"Registered v{registration.version}; {decision.action}.")
        yield project, runs, started


@pytest.fixture
def pipeline(pipeline_run):
    """The pipeline run, with MLflow pointed at its store (another test may have moved it)."""
    use_store(pipeline_run[0])
    return pipeline_run


def test_experiments_are_machine_learning_experiments_with_a_description(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    use_store(tmp_path)
    client = MlflowClient()
    experiment = client.get_experiment(pipeline_experiment(Path("data/hotdog"), tmp_path))
    assert experiment.name == "finetune-hotdog"
    assert experiment.tags[KIND_TAG] == ML_KIND == "custom_model_development"  # the UI's "Machine learning"
    assert "Fine-tuned vs from-scratch" in experiment.tags[NOTE_TAG]
    # An experiment made before (no kind, no description) gets both; a description someone
    # wrote in the UI stays.
    older = client.create_experiment("finetune-older", artifact_location=(tmp_path / "a").as_uri())
    again = client.get_experiment(pipeline_experiment(Path("data/older"), tmp_path))
    assert again.experiment_id == older and again.tags[KIND_TAG] == ML_KIND and again.tags[NOTE_TAG]
    client.set_experiment_tag(older, NOTE_TAG, "my own words")
    pipeline_experiment(Path("data/older"), tmp_path)
    assert client.get_experiment(older).tags[NOTE_TAG] == "my own words"


def test_runtime_tags_describe_the_device_used():
    tags = runtime_tags(torch.device("cpu"), "fp32")
    assert tags["device"] == "cpu" and tags["precision"] == "fp32"
    assert "cuda" not in tags and not any(key.startswith("gpu.") for key in tags)  # nothing of CUDA on a CPU run
    assert tags["cpu.name"] and "+" not in tags["torch"]
    assert int(tags["cpu.cores"]) == len(os.sched_getaffinity(0)) and int(tags["cpu.threads"]) >= 1
    if torch.cuda.is_available():
        gpu = runtime_tags(torch.device("cuda", 0), "bf16")
        assert gpu["gpu.name"] == torch.cuda.get_device_name(0) and float(gpu["gpu.memory_gb"]) > 0
        assert gpu["cuda"] == torch.version.cuda and not any(key.startswith("cpu.") for key in gpu)


def test_a_parent_run_without_an_orchestrator_starts_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(PIPELINE_START, str(int(time.time() * 1000) + 3_600_000))  # a clock gone wrong: ignored
    use_store(tmp_path)
    before = int(time.time() * 1000)
    run = MlflowClient().get_run(parent_run(pipeline_experiment(Path("data/hotdog"), tmp_path), "k", {}))
    assert before <= run.info.start_time <= int(time.time() * 1000) and run.info.status == "RUNNING"
    assert close_pipeline_run(tmp_path, Path("data/hotdog"), "no-such-key") is None


@pytest.mark.slow
def test_the_parent_run_spans_the_pipeline_and_carries_the_comparison(pipeline):
    project, runs, started = pipeline
    client = MlflowClient()
    children = {variant: client.get_run(run_id) for variant, run_id in runs.items()}
    parent = client.get_run(children["finetune"].data.tags["mlflow.parentRunId"])
    assert children["scratch"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.start_time == started  # the pipeline's start, not the first training's
    assert parent.info.status == "FINISHED"
    for child in children.values():
        assert parent.info.start_time < child.info.start_time and child.info.end_time <= parent.info.end_time
    metrics = parent.data.metrics
    assert {"finetune.accuracy", "scratch.accuracy", "delta.accuracy", "mcnemar_p_value"} <= metrics.keys()
    assert metrics["delta.accuracy"] == pytest.approx(metrics["finetune.accuracy"] - metrics["scratch.accuracy"])
    note = parent.data.tags[NOTE_TAG]
    # The verdict, as reports/evaluate.md opens (the same function: a comparison of two tiny
    # trainings may say that one did no better than chance instead of naming a winner).
    document = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert note.splitlines()[0] == verdict_line(document)
    assert f"**Verdict**: {note.splitlines()[0]}" in (project / "reports" / "evaluate.md").read_text()
    assert note.endswith("Registered v1; promoted.")  # the flow's end adds the outcome
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/evaluate.md", "evaluation/curves.png"} <= artifacts


@pytest.mark.slow
def test_training_runs_read_at_a_glance(pipeline):
    _, runs, _ = pipeline
    client = MlflowClient()
    scratch, finetune = client.get_run(runs["scratch"]), client.get_run(runs["finetune"])
    # Learning rates named by group: `lr` is every variant's base rate (one group, or the body),
    # so the runs compare on one column; the new head's own is lr.head (metric lr_head).
    assert "lr" in scratch.data.params and not any(k.startswith("lr.") for k in scratch.data.params)
    assert {"lr", "lr.head"} <= finetune.data.params.keys() and "lr.body" not in finetune.data.params
    assert float(finetune.data.params["lr.head"]) == 10 * float(finetune.data.params["lr"])
    assert "lr" in scratch.data.metrics and not any(k.startswith("lr_") for k in scratch.data.metrics)
    assert {"lr", "lr_head"} <= finetune.data.metrics.keys() and "lr_body" not in finetune.data.metrics
    # Validation accuracy is each run's first metric (as the store lists them): MLflow's compare
    # view plots lr against it.
    for run in (scratch, finetune):
        assert next(iter(run.data.metrics)) == "val_acc", list(run.data.metrics)
    for run in (scratch, finetune):
        # Only training settings: the serving limits went into the registered model, not here.
        assert not {"max_image_mb", "max_pixels"} & run.data.params.keys()
        assert run.data.tags["device"] == "cpu" and "cuda" not in run.data.tags and run.data.tags["cpu.name"]
        variant = run.data.tags["variant"]
        note = run.data.tags[NOTE_TAG]
        accuracy = run.data.metrics["eval_accuracy"]
        assert note.startswith(f"{variant}: test accuracy {accuracy:.3f}; kept epoch ")
        assert " of 2 (best: validation accuracy " in note


@pytest.mark.slow
def test_the_registry_keeps_its_books_in_an_experiment_of_its_own(pipeline):
    project, runs, _ = pipeline
    params = load_params(project / "params.yaml")
    client = MlflowClient()
    training = client.get_experiment_by_name(pipeline_experiment_name(params.data.dir))
    names = {r.info.run_name for r in client.search_runs([training.experiment_id])}
    assert names == {"finetune", "scratch", f"pipeline-{KEY[:8]}"}  # no registry-... among them
    books = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    assert books.tags[KIND_TAG] == ML_KIND and books.tags[NOTE_TAG]
    (run,) = client.search_runs([books.experiment_id])
    assert run.info.run_name == f"registry-{params.register_.model_name}"
    assert [d["action"] for d in promotion_log(params, project)] == ["promoted"]
    # The served model still has its limits (limits.json in the model, not params of the run).
    served = load_served(f"models:/{params.register_.model_name}@candidate", project).unwrap_python_model()
    assert served.max_bytes == int(params.serve.max_image_mb * 2**20)
    assert served.max_pixels == params.validate_.max_pixels


def test_an_older_stores_promotion_log_moves_to_the_registry_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p")
    params = load_params(project / "params.yaml")
    use_store(project)
    client = MlflowClient()
    name = params.register_.model_name
    old_experiment = pipeline_experiment(params.data.dir, project)
    old = client.create_run(old_experiment, run_name=f"registry-{name}", tags={LOG_TAG: name}).info.run_id
    (tmp_path / LOG_FILE).write_text(json.dumps({"action": "promoted", "candidate": "1"}) + "\n")
    client.log_artifact(old, str(tmp_path / LOG_FILE))
    assert promotion_log(params, project) == [{"action": "promoted", "candidate": "1"}]
    assert client.get_run(old).info.lifecycle_stage == "deleted"  # gone from the training runs
    assert not client.search_runs([old_experiment])
    books = client.get_experiment_by_name(REGISTRY_EXPERIMENT).experiment_id
    (moved,) = client.search_runs([books], filter_string=f"tags.`{LOG_TAG}` = '{name}'")
    assert moved.info.run_id != old


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "meta", "cuda"])
def test_the_logged_model_loads_on_any_device(pipeline, device, tmp_path):
    """``meta`` stands in for a device other than the one that saved the weights where there is
    no GPU: a torch.export program (MLflow 3's default) ignores map_location and stays on the
    CPU; the pickled module goes where it is told."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here (the GPU check runs this on one)")
    _, runs, _ = pipeline
    client = MlflowClient()
    experiment = client.get_run(runs["finetune"]).info.experiment_id
    # One logged model per run (the network stored once), read by both flavours.
    (logged,) = [m for m in client.search_logged_models([experiment]) if m.source_run_id == runs["finetune"]]
    assert logged.name == "classifier"
    uri = f"models:/{logged.model_id}"
    model = mlflow.pytorch.load_model(uri, dst_path=str(tmp_path), map_location=device)
    assert all(p.device.type == device and p.dtype == torch.float32 for p in model.parameters())
    images = torch.rand(3, 3, 32, 32, device=device)  # any batch size
    with torch.inference_mode():
        out = model(images)
    assert out.shape == (3, 2) and out.device.type == device
    if device == "meta":
        return
    (tmp_path / "pyfunc").mkdir()
    served = mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path / "pyfunc"))
    network = served.unwrap_python_model().network
    assert torch.allclose(network(images.cpu()), model.cpu()(images.cpu()), atol=1e-6)


@pytest.mark.slow
def test_every_run_names_the_data_it_used(pipeline):
    """Dataset inputs: the split, the DVC hash as digest, data.url as source, the use as context."""
    project, runs, _ = pipeline
    client = MlflowClient()
    url = load_params(project / "params.yaml").data.url
    for variant, run_id in runs.items():
        inputs = client.get_run(run_id).inputs.dataset_inputs
        used = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
        assert used == {"hotdog/train": "train", "hotdog/validation": "validation", "hotdog/test": "test"}, variant
        assert {i.dataset.digest for i in inputs} == {DATA_HASH}
        assert all(json.loads(i.dataset.source)["url"] == url for i in inputs)
    parent = client.get_run(runs["finetune"]).data.tags["mlflow.parentRunId"]
    assert [i.dataset.name for i in client.get_run(parent).inputs.dataset_inputs] == ["hotdog/test"]


@pytest.mark.slow
def test_the_printed_view_shows_both_variants_best_validation_first(pipeline):
    """The saved view that the run's closing lines link to: the pipeline's two trainings (no search
    trial, no other pipeline run) in the order the UI sorts them, with the columns a reviewer
    needs; the compare page of the same two runs; the registered version's page."""
    project, runs, _ = pipeline
    params = load_params(project / "params.yaml")
    links = pipeline_links(project, params.data.dir, KEY, 5055, (params.register_.model_name, "1"))
    client = MlflowClient()
    experiment = client.get_run(runs["finetune"]).info.experiment_id
    parent = client.get_run(runs["finetune"]).data.tags["mlflow.parentRunId"]
    assert links["runs"] == f"http://127.0.0.1:5055/#/experiments/{experiment}/runs?viewStateShareKey=pipeline-{parent}"
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.pipeline-{parent}"])
    shown = client.search_runs([experiment], view["searchFilter"], order_by=["metrics.`selected.val_acc` DESC"])
    assert sorted(r.info.run_id for r in shown) == sorted(runs.values())
    assert shown[0].data.metrics["selected.val_acc"] >= shown[1].data.metrics["selected.val_acc"]
    assert {"metrics.`selected.val_acc`", "metrics.`eval_accuracy`", "attributes.`Models`"} <= set(view["selectedColumns"])
    assert view["orderByKey"] == "metrics.`selected.val_acc`" and view["orderByAsc"] is False
    assert all(run_id in urllib.parse.unquote(links["compare"]) for run_id in runs.values())
    assert links["model"] == f"http://127.0.0.1:5055/#/models/{params.register_.model_name}/versions/1"
    assert links["parent"].endswith(f"/runs/{parent}")
