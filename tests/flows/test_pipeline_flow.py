"""`make demo`'s path end to end: demo-setup, then the Prefect flow (local ephemeral server)
running the DVC stages in the demo workspace of a temporary copy of the project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tree_digest

from finetune.core.config import load_params
from finetune.demo.workspace import sync_workspace, write_params
from flows.plan import stage_order


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # 450 s: the flow now runs the search stages too (on a loaded 2-core machine a run took over 300 s)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=450)


@pytest.mark.slow
def test_demo_runs_through_prefect_and_dvc(tmp_path, prefect_env):
    quick = {"model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32,
             **{f"{stage}.{key}": value for stage in ("pretrain.train", "train.finetune", "train.scratch")
                for key, value in (("epochs", 1), ("batch_size", 8), ("workers", 0), ("val_fraction", 0.5),
                                   # one step on a few images cannot learn: plumbing, not judgment
                                   ("judge_epochs", False), ("min_steps", 0))},
             "search.enabled": False}  # the search stages run and record each recipe's lr (test_judgment trains them)
    small = {"demo.train_per_class": 6, "demo.test_per_class": 3, "demo.source_classes": 3,
             "demo.source_train_per_class": 4, "demo.source_test_per_class": 2, "demo.overrides": quick}
    project = sync_workspace(REPO, tmp_path / "project", small, share_cache=False)
    params_before = (project / "params.yaml").read_text()
    python = sys.executable

    setup = run([python, "-m", "finetune", "demo-setup"], project, prefect_env)
    assert setup.returncode == 0, setup.stderr
    demo = project / "demo"
    archive = demo / "mirror" / "hotdog.zip"
    assert load_params(demo / "params.yaml").data.url == archive.as_uri()

    first = run([python, "-m", "flows.pipeline", "--workspace", "demo"], project, prefect_env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'fetch'" in first.stdout + first.stderr
    assert "validation passed: 18 of 18 files" in first.stdout + first.stderr
    for stage in ("pretrain", "search@finetune", "search@scratch", "train@finetune", "train@scratch", "evaluate",
                  "register"):
        assert f"Running stage '{stage}'" in first.stdout + first.stderr
    search = json.loads((demo / "metrics" / "search" / "scratch.json").read_text())
    assert search == {"variant": "scratch", "enabled": False, "lr": load_params(demo / "params.yaml").train[
        "scratch"].lr, "note": search["note"]}
    # 6 test images cannot show a model beat chance at evaluate.chance_p (6 of 6 at 1/2 is p =
    # 0.016): the register stage registers nothing, says why, and the flow goes on to its report.
    output = first.stdout + first.stderr
    assert "nothing registered: finetune did no better than chance" in output
    assert "no promotion gate: the register stage registered nothing" in output and "promoted:" not in output
    record = json.loads((demo / "reports" / "register.json").read_text())
    assert record["registered"] is False and record["version"] is None
    report = (demo / "reports" / "evaluate.md").read_text()
    assert "McNemar (exact)" in report and "| accuracy |" in report
    assert "finetune did no better than chance" in report and "scratch did no better than chance" in report
    assert "no winner" in report.splitlines()[2]
    assert (demo / "models" / "finetune" / "model.pt").exists() and (demo / "models" / "source" / "model.pt").exists()
    files = tree_digest(demo / "data" / "hotdog")
    assert sum(name.startswith("train/hotdog/") for name in files) == 6
    assert sum(name.startswith("test/not-hotdog/") for name in files) == 3
    status = run([python, "-m", "dvc", "status", "--json"], demo, prefect_env)
    assert status.stdout.strip() == "{}"
    # The project itself is untouched, and the demo's data went to the project's DVC cache.
    assert (project / "params.yaml").read_text() == params_before
    assert not (project / "data" / "hotdog").exists()
    assert any((project / ".dvc" / "cache").rglob("*.dir"))

    # demo-setup again regenerates the same bytes, so DVC has nothing to redo.
    assert run([python, "-m", "finetune", "demo-setup"], project, prefect_env).returncode == 0
    second = run([python, "-m", "flows.pipeline", "--workspace", "demo"], project, prefect_env)
    assert second.returncode == 0, second.stderr
    assert "skipped (up to date)" in second.stdout + second.stderr
    # Nothing changed: still nothing registered, and no gate to run.
    assert "no promotion gate: the register stage registered nothing" in second.stdout + second.stderr
    assert tree_digest(demo / "data" / "hotdog") == files


@pytest.mark.slow
def test_a_failing_stage_fails_the_flow_and_keeps_the_data(tmp_path, prefect_env):
    project = sync_workspace(REPO, tmp_path / "project", {}, share_cache=False)
    mirror = project / "mirror" / "hotdog.zip"
    mirror.parent.mkdir()
    mirror.write_bytes(b"<html>not the archive</html>")
    write_params(project / "params.yaml", project / "params.yaml",
                 {"data.url": mirror.as_uri(), "data.checksum": "sha256:" + "0" * 64})
    result = run([sys.executable, "-m", "flows.pipeline"], project, prefect_env)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "pipeline failed: stage 'fetch' failed" in output
    assert "Checksum mismatch" in output and "HTML page" in output  # DVC's output, in the task log
    assert mirror.exists() and not (project / "data" / "hotdog").exists()


def test_stage_order_follows_the_dag(tmp_path):
    workspace = sync_workspace(REPO, tmp_path / "ws", {}, share_cache=False)
    pipeline = (workspace / "dvc.yaml").read_text()
    # Written before the stage it depends on: the order must come from the graph, not the file.
    extra = "  count:\n    cmd: wc -l data/validate/files.csv > count.txt\n    deps: [data/validate/files.csv]\n    outs: [count.txt]\n"
    (workspace / "dvc.yaml").write_text(pipeline.replace("stages:\n", "stages:\n" + extra, 1))
    order = stage_order(workspace)
    study = [f"study@{seed}" for seed in load_params(workspace / "params.yaml").study.seeds]
    assert sorted(order) == sorted(["count", "evaluate", "fetch", "pretrain", "register", "search@finetune",
                                    "search@scratch", "train@finetune", "train@scratch", "validate", "study_plan",
                                    "study_report", *study])
    before = {"validate": ["fetch"], "count": ["validate"], "search@finetune": ["validate", "pretrain"],
              "search@scratch": ["validate"], "train@finetune": ["search@finetune"],
              "train@scratch": ["search@scratch"], "evaluate": ["train@finetune", "train@scratch"],
              "register": ["evaluate"], "study_plan": ["search@finetune", "search@scratch"],
              **{seed: ["study_plan"] for seed in study}, "study_report": study}
    for stage, upstream in before.items():
        assert all(order.index(u) < order.index(stage) for u in upstream), order
    # The study comes after everything it does not feed: the candidate is registered first.
    assert order[-len(study) - 2:] == ["study_plan", *study, "study_report"], order
