"""Workspaces: copies of the project with their own params.yaml, dvc.lock and data."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO

from finetune.config import load_params
from finetune.demo.workspace import project_files, sync_workspace, write_params


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
