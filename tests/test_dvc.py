"""The pipeline through real DVC commands in a temporary copy of the repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_DATA, dataset_zip, dvc, sha, tree_digest

from finetune.core.config import load_params
from finetune.demo.workspace import sync_workspace, write_params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of the repository whose data.url is a local archive, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("dvc")
    mirror = root / "hotdog.zip"
    mirror.write_bytes(dataset_zip())
    overrides = {"data.url": mirror.as_uri(), "data.checksum": sha(mirror.read_bytes()), **TINY_DATA}
    workspace = sync_workspace(REPO, root / "ws", overrides, share_cache=False)
    result = dvc(workspace, "repro")
    assert "Running stage 'fetch'" in result.stdout and "Running stage 'validate'" in result.stdout
    return workspace


@pytest.mark.slow
def test_repro_fetch_produces_the_dataset_recorded_in_dvc_lock(workspace):
    assert len(tree_digest(workspace / "data" / "hotdog")) == 10
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    out = lock["stages"]["fetch"]["outs"][0]
    assert out["path"] == "data/hotdog" and out["md5"].endswith(".dir") and out["nfiles"] == 10
    assert lock["stages"]["fetch"]["params"]["params.yaml"]["data.url"].startswith("file://")
    assert (workspace / "data" / ".gitignore").read_text().strip() == "/hotdog"


@pytest.mark.slow
def test_status_is_clean_and_a_second_repro_runs_nothing(workspace):
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"
    before = tree_digest(workspace / "data" / "hotdog")
    lock = (workspace / "dvc.lock").read_text()
    result = dvc(workspace, "repro")
    assert "Running stage" not in result.stdout
    assert "didn't change, skipping" in result.stdout or "up to date" in result.stdout
    assert tree_digest(workspace / "data" / "hotdog") == before
    assert (workspace / "dvc.lock").read_text() == lock


@pytest.mark.slow
def test_stale_stages_names_what_dvc_would_run(workspace):
    from flows.plan import stale_stages

    assert stale_stages(workspace) == set()
    params = (workspace / "params.yaml").read_text()
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"train.scratch.seed": 7})
    try:
        # the flow runs it and what follows: its search (the recipe is the grid's centre), its
        # training; and the study's plan, whose file says only "disabled" (the study stays up to date)
        assert stale_stages(workspace) == {"search@scratch", "train@scratch", "study_plan"}
    finally:
        (workspace / "params.yaml").write_text(params)
    assert stale_stages(workspace) == set()


@pytest.mark.slow
def test_editing_the_test_transform_makes_evaluate_stale(workspace):
    """evaluate imports finetune/data/portable.py (the test transform) through its folder dep: an
    edit there must rerun it, not report stale results as current (the old lineage hole)."""
    images = workspace / "finetune" / "data" / "portable.py"
    source = images.read_text()
    assert "v2.CenterCrop(crop)" in source
    images.write_text(source.replace("v2.CenterCrop(crop)", "v2.CenterCrop(crop - 2)"))
    try:
        stale = json.loads(dvc(workspace, "status", "--json").stdout)
        assert {"evaluate", "train@finetune", "train@scratch"} <= set(stale)
    finally:
        images.write_text(source)
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
def test_a_failed_training_keeps_the_last_good_metrics_and_plots(workspace):
    kept = ["metrics/train/scratch.json", "plots/train/scratch.csv"]
    before = {name: (workspace / name).read_bytes() for name in kept}
    params = (workspace / "params.yaml").read_text()
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"train.scratch.lr": -1})
    try:
        result = dvc(workspace, "repro", check=False)
        assert result.returncode != 0 and "train.scratch.lr" in result.stderr + result.stdout
        assert {name: (workspace / name).read_bytes() for name in kept} == before
    finally:
        (workspace / "params.yaml").write_text(params)
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value"), [("model.arch", "resnet81"), ("model.weights", "JPEG")])
def test_invalid_model_settings_stop_the_pipeline_before_dvc_records_them(workspace, key, value):
    if value == "JPEG":  # a real image given as weights
        value = str(next((workspace / "data" / "hotdog" / "train").rglob("*.jpg")).relative_to(workspace))
    lock = (workspace / "dvc.lock").read_text()
    params = (workspace / "params.yaml").read_text()
    write_params(workspace / "params.yaml", workspace / "params.yaml", {key: value})
    try:
        result = dvc(workspace, "repro", check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "error: " in output and key in output and "Traceback" not in output
        assert "Running stage 'pretrain'" in output  # whose own work does not read model.arch
        assert (workspace / "dvc.lock").read_text() == lock
    finally:
        (workspace / "params.yaml").write_text(params)
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
def test_a_failed_repro_keeps_the_dataset_and_the_lock(workspace):
    before = tree_digest(workspace / "data" / "hotdog")
    lock = (workspace / "dvc.lock").read_text()
    params = (workspace / "params.yaml").read_text()
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"data.checksum": sha(b"other")})
    try:
        result = dvc(workspace, "repro", "fetch", check=False)
        assert result.returncode != 0
        assert "Checksum mismatch" in result.stderr + result.stdout
        assert tree_digest(workspace / "data" / "hotdog") == before
        assert (workspace / "dvc.lock").read_text() == lock
    finally:
        (workspace / "params.yaml").write_text(params)
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
def test_push_and_pull_through_the_default_remote(workspace):
    before = tree_digest(workspace / "data" / "hotdog")
    dvc(workspace, "push")
    assert (workspace / "dvc-storage").is_dir()
    subprocess.run(["rm", "-rf", "data/hotdog", ".dvc/cache"], cwd=workspace, check=True)
    dvc(workspace, "pull")  # no cache left: the data must come from the remote
    assert tree_digest(workspace / "data" / "hotdog") == before


def test_the_repo_config_has_analytics_off_and_a_default_remote():
    config = (REPO / ".dvc" / "config").read_text()
    assert "analytics = false" in config
    assert "remote = local" in config and "url = ../dvc-storage" in config


@pytest.mark.slow
def test_dvc_exp_run_overrides_data_params(tmp_path):
    """`dvc exp run -S` works for the data keys (here: another archive, unverified)."""
    mirror = tmp_path / "other.zip"
    mirror.write_bytes(dataset_zip(variant=5))
    workspace = sync_workspace(REPO, tmp_path / "ws", TINY_DATA, share_cache=False)
    result = dvc(workspace, "exp", "run", "-S", f"data.url={mirror}", "-S", "data.checksum=null")
    assert "Running stage 'fetch'" in result.stdout
    assert len(tree_digest(workspace / "data" / "hotdog")) == 10
    applied = load_params(workspace / "params.yaml").data
    assert applied.checksum is None and applied.url == str(mirror)
    assert dvc(workspace, "status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
def test_repro_ends_with_a_registered_candidate_and_dvc_shows_the_evaluation(workspace, tmp_path):
    """`dvc repro` alone runs evaluate and register: dvc metrics and plots read their files."""
    record = json.loads((workspace / "reports" / "register.json").read_text())
    assert record["model_name"] == "hotdog-classifier" and record["version"] == "1"
    assert record["variant"] in ("finetune", "scratch")
    declared = json.loads(dvc(workspace, "metrics", "show", "--json").stdout)
    assert list(next(iter(declared.values()))["data"]) == ["metrics/summary.json"]  # the one short table
    metrics = json.loads(dvc(workspace, "metrics", "show", "--json", "metrics/evaluate.json").stdout)
    evaluation = next(iter(metrics.values()))["data"]["metrics/evaluate.json"]["data"]
    assert set(evaluation) == {"finetune", "scratch", "comparison"}
    assert 0 <= evaluation["comparison"]["mcnemar"]["p_value"] <= 1
    html = tmp_path / "plots"
    dvc(workspace, "plots", "show", "-o", str(html))
    page = (html / "index.html").read_text()
    # (the "validation accuracy per epoch" chart needs a validation split, which the tiny
    # workspace trains without: conftest's TINY_TRAIN)
    for title in ("confusion matrix finetune", "confusion matrix scratch", "ROC"):
        assert title in page
    # The version is in the workspace's own MLflow store, with the alias `candidate`.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}")
    assert client.get_model_version_by_alias("hotdog-classifier", "candidate").version == 1
