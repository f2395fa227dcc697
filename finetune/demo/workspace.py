"""Workspaces: copies of this project that run the same pipeline with other params.

The offline demo (and the DVC tests) run in one so that the project's own params.yaml,
dvc.lock and data are never touched. A workspace is a git + DVC repository of its own; it may
share the project's DVC cache so that data is stored once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from finetune.config import PARAMS_FILE

# Files each workspace keeps for itself: its settings and its pipeline state.
_OWN_FILES = {PARAMS_FILE.name, "dvc.lock"}


def project_files(project: Path) -> list[Path]:
    """The project's files as git sees them: tracked, plus untracked ones it does not ignore."""
    listing = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], project)
    names = sorted(set(filter(None, listing.split("\0"))))
    return [Path(name) for name in names if (project / name).is_file()]


def sync_workspace(project: Path, workspace: Path, overrides: Mapping[str, Any], share_cache: bool) -> Path:
    """Create or update ``workspace`` from ``project``, with ``overrides`` applied to its params.

    ``overrides`` maps dotted keys (``data.url``) to values. Code and pipeline files are
    refreshed from the project on every call; the workspace's dvc.lock and data stay its own.
    """
    project, workspace = project.resolve(), workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    for name in project_files(project):
        if name.as_posix() in _OWN_FILES:
            continue
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / name, workspace / name)
    write_params(project / PARAMS_FILE, workspace / PARAMS_FILE, overrides)
    if not (workspace / ".git").exists():
        _init_git(workspace)
    if share_cache:
        _run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(project / ".dvc" / "cache")],
             workspace)
    return workspace


def write_params(source: Path, dest: Path, overrides: Mapping[str, Any]) -> None:
    """Copy a params file with dotted-key ``overrides`` set, keeping its comments and order."""
    yaml = YAML()
    params = yaml.load(source.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        if leaf not in section:
            raise KeyError(f"{source} has no key {key!r} to override")
        section[leaf] = value
    with open(dest, "w", encoding="utf-8") as f:
        yaml.dump(params, f)


def stage_env() -> dict[str, str]:
    """The environment for DVC commands: this interpreter's bin/ first, so dvc.yaml's
    `python -m finetune ...` runs in the same environment even when it is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _init_git(workspace: Path) -> None:
    """Make the workspace a repository of its own (DVC wants one), with a first commit."""
    _run(["git", "init", "-q"], workspace)
    _run(["git", "add", "-A"], workspace)
    _run(["git", "-c", "user.name=finetune", "-c", "user.email=finetune@localhost",
          "commit", "-q", "-m", "workspace created from the project"], workspace)


def _run(command: list[str], cwd: Path) -> str:
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout
