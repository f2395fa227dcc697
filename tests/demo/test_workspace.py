"""Workspaces: copies of the project with their own params.yaml, dvc.lock and data."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from finetune.core.config import load_params
from finetune.data.lineage import git_commit
from finetune.demo.workspace import project_files, record_run, stage_env, sync_workspace, write_params


def test_project_files_are_what_git_would_commit():
    names = {path.as_posix() for path in project_files(REPO)}
    assert {"params.yaml", "dvc.yaml", "finetune/cli.py", ".dvc/config", "Makefile"} <= names
    assert not any(name.startswith((".venv/", "demo/", "data/downloads/", ".git/")) for name in names)


def test_write_params_sets_dotted_keys_and_keeps_comments(tmp_path):
    dest = tmp_path / "params.yaml"
    write_params(REPO / "params.yaml", dest, {"data.retries": 9, "demo.seed": 3})
    text = dest.read_text()
    assert "# The only configuration of the pipeline" in text and "(zip bombs)" in text
    params = load_params(dest)
    assert params.data.retries == 9 and params.demo.seed == 3
    assert params.data.url == load_params(REPO / "params.yaml").data.url


def test_write_params_refuses_unknown_keys(tmp_path):
    with pytest.raises(KeyError, match="data.retires"):
        write_params(REPO / "params.yaml", tmp_path / "params.yaml", {"data.retires": 9})


def test_a_refresh_keeps_the_workspaces_own_state(tmp_path):
    workspace = sync_workspace(REPO, tmp_path / "ws", {"demo.seed": 7}, share_cache=False)
    assert (workspace / ".git").is_dir() and (workspace / "finetune" / "cli.py").is_file()
    log = subprocess.run(["git", "log", "--oneline"], cwd=workspace, capture_output=True, text=True)
    assert log.stdout.count("\n") == 1
    (workspace / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (workspace / "finetune" / "cli.py").write_text("stale")

    sync_workspace(REPO, workspace, {"demo.seed": 8}, share_cache=False)
    assert (workspace / "dvc.lock").read_text() == "schema: '2.0'\nstages: {}\n"
    assert (workspace / "finetune" / "cli.py").read_bytes() == (REPO / "finetune" / "cli.py").read_bytes()
    assert load_params(workspace / "params.yaml").demo.seed == 8


def test_a_shared_cache_points_at_the_projects(tmp_path):
    workspace = sync_workspace(REPO, tmp_path / "ws", {}, share_cache=True)
    local = (workspace / ".dvc" / "config.local").read_text()
    assert str(REPO / ".dvc" / "cache") in local


def git(workspace, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout


def test_a_workspace_stays_clean_when_its_stages_rewrite_the_gx_suites(tmp_path):
    """The validate stage rewrites the GX context (suites from the workspace's own thresholds,
    validation definitions naming them by id): it is not in the workspace's git, so a run from
    the committed refresh records a clean commit."""
    workspace = sync_workspace(REPO, tmp_path / "ws", {"validate.min_images_per_class": 3}, share_cache=False)
    assert git(workspace, "status", "--porcelain") == ""
    assert not any(name.startswith("gx/") for name in git(workspace, "ls-files").split())
    assert (workspace / "gx" / "great_expectations.yml").is_file()  # on disk all the same
    for name in ("expectations/classes.json", "validation_definitions/classes.json"):  # what validate does
        (workspace / "gx" / name).write_text("{}")
    assert git(workspace, "status", "--porcelain", "--ignored").splitlines() == ["!! gx/"]
    assert git(workspace, "status", "--porcelain") == ""
    assert not git_commit(workspace).endswith("+dirty")

    # A refresh after a change in the project is a commit of its own; an unchanged one is none.
    sync_workspace(REPO, workspace, {"validate.min_images_per_class": 4}, share_cache=False)
    sync_workspace(REPO, workspace, {"validate.min_images_per_class": 4}, share_cache=False)
    assert git(workspace, "log", "--format=%s").splitlines() == [
        f"workspace refreshed from the project at {git(REPO, 'rev-parse', '--short', 'HEAD').strip()}"] * 2
    assert git(workspace, "status", "--porcelain") == ""


def test_a_recorded_run_is_committed_and_tagged_and_the_next_run_starts_clean(tmp_path):
    workspace = sync_workspace(REPO, tmp_path / "ws", {}, share_cache=False)
    lock = "schema: '2.0'\nstages:\n  evaluate:\n    outs:\n    - path: metrics/evaluate.json\n"
    (workspace / "dvc.lock").write_text(lock)
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "evaluate.json").write_text('{"acc": 0.5}')

    first = record_run(workspace, "demo-run")
    assert "tag demo-run-1" in first
    assert git(workspace, "status", "--porcelain") == ""
    recorded = git(workspace, "show", "--format=", "--name-only", "demo-run-1").split()
    assert recorded == ["dvc.lock", "metrics/evaluate.json"]
    assert "nothing new to record" in record_run(workspace, "demo-run")

    # The next run rewrites dvc.lock and its outputs: the code commit stays clean meanwhile...
    (workspace / "dvc.lock").write_text(lock + "# rerun\n")
    (workspace / "metrics" / "evaluate.json").write_text('{"acc": 0.6}')
    assert git_commit(workspace) == git(workspace, "rev-parse", "HEAD").strip()
    assert "tag demo-run-2" in record_run(workspace, "demo-run")
    # ...while a change to the code is dirt.
    (workspace / "finetune" / "cli.py").write_text("changed")
    assert git_commit(workspace).endswith("+dirty")


@pytest.mark.slow
def test_a_finished_demo_leaves_its_git_clean_and_tags_what_it_ran(tmp_path):
    """`make demo`'s two commands, tiny: the registered version names a clean commit, the run is
    committed and tagged, and `git status` in the demo has nothing to say."""
    from mlflow.tracking import MlflowClient

    from finetune.tracking.store import use_store

    tiny = {"epochs": 1, "batch_size": 8, "workers": 0, "val_fraction": 0, "select": "last",
            "judge_epochs": False, "min_steps": 0}  # one step on a few images: plumbing, not judgment
    # evaluate.chance_p: 6 test images can never beat chance at 0.01 (conftest's TINY_DATA says
    # why), and this test needs a registered version.
    quick = {"model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32, "evaluate.chance_p": 0.99,
             **{f"{stage}.{key}": value for stage in ("pretrain.train", "train.finetune", "train.scratch")
                for key, value in tiny.items()}}
    small = {"demo.train_per_class": 6, "demo.test_per_class": 3, "demo.source_classes": 3,
             "demo.source_train_per_class": 4, "demo.source_test_per_class": 2, "demo.overrides": quick}
    project = sync_workspace(REPO, tmp_path / "project", small, share_cache=False)
    env = stage_env() | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    for command in (["finetune", "demo-setup"], ["flows.pipeline", "--tag", "demo-run", "--workspace", "demo"]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    demo = project / "demo"
    output = done.stdout + done.stderr
    assert "tag demo-run-1" in output and "To track the changes with git" not in output
    assert git(demo, "status", "--porcelain") == ""
    assert {"dvc.lock", "metrics/evaluate.json", "reports/register.json"} <= set(
        git(demo, "show", "--format=", "--name-only", "demo-run-1").split())
    use_store(demo)
    version = MlflowClient().get_model_version("hotdog-classifier", "1")
    assert version.tags["git_commit"] == git(demo, "rev-parse", "demo-run-1^").strip()  # the refresh, clean
