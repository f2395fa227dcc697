"""Workspaces: copies of this project that run the same pipeline with other params.

The offline demo (and the DVC tests) run in one so that the project's own params.yaml,
dvc.lock and data are never touched. A workspace is a git + DVC repository of its own; it may
share the project's DVC cache so that data is stored once.

Its git stays clean: every refresh is committed, so a run records a commit without ``+dirty``;
the Great Expectations context, which the validate stage rewrites from the workspace's own
``validate:`` settings, is kept out of its git (derived, like dvc.lock's outputs); and
:func:`record_run` commits what a run wrote (dvc.lock, metrics, reports) and tags it.
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

from finetune.core.config import PARAMS_FILE

# Files each workspace keeps for itself: its settings and its pipeline state.
_OWN_FILES = {PARAMS_FILE.name, "dvc.lock"}
_AUTHOR = ["-c", "user.name=finetune", "-c", "user.email=finetune@localhost"]


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
    copied = [name for name in project_files(project) if name.as_posix() not in _OWN_FILES]
    for name in copied:
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / name, workspace / name)
    write_params(project / PARAMS_FILE, workspace / PARAMS_FILE, overrides)
    if not (workspace / ".git").exists():
        _run(["git", "init", "-q"], workspace)
    derived = _derived(workspace)
    commit_refresh(workspace, [PARAMS_FILE, *(n for n in copied if not _under(n, derived))], derived,
                   f"workspace refreshed from the project at {_head(project)}")
    if share_cache:
        _run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(project / ".dvc" / "cache")],
             workspace)
    return workspace


def commit_refresh(workspace: Path, names: list[Path], derived: list[Path], message: str) -> None:
    """Commit ``names`` in the workspace's git, with ``derived`` untracked and ignored there
    (files its own stages rewrite); nothing when nothing changed."""
    exclude = workspace / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    wanted = [f"/{path.as_posix()}/" for path in derived]
    if missing := [line for line in wanted if line not in lines]:
        exclude.write_text("\n".join([*lines, "# rewritten by the workspace's own stages", *missing]) + "\n")
    for path in derived:
        _run(["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", path.as_posix()], workspace)
    _run(["git", "add", "-A", "-f", "--pathspec-from-file=-", "--pathspec-file-nul"], workspace,
         stdin="\0".join(name.as_posix() for name in names))
    if _staged(workspace):
        _run(["git", *_AUTHOR, "commit", "-q", "--no-verify", "-m", message], workspace)


def record_run(workspace: Path, prefix: str) -> str:
    """Commit what a pipeline run wrote in ``workspace`` (dvc.lock, the .gitignore files DVC
    keeps, metrics, plots, reports; data and models stay in DVC's cache) and tag the commit
    ``<prefix>-<n>``; a line that says what was recorded."""
    workspace = workspace.resolve()
    _run(["git", "add", "-A"], workspace)
    if _staged(workspace):
        _run(["git", *_AUTHOR, "commit", "-q", "--no-verify", "-m", f"{prefix}: dvc.lock and the results of the run"],
             workspace)
    head = _head(workspace)
    if current := _run(["git", "tag", "--points-at", "HEAD", "--list", f"{prefix}-*"], workspace).split():
        return f"nothing new to record in {workspace}'s git: the run is {current[-1]} ({head})"
    numbers = [int(tag.rsplit("-", 1)[1]) for tag in _run(["git", "tag", "--list", f"{prefix}-*"], workspace).split()
               if tag.rsplit("-", 1)[1].isdigit()]
    tag = f"{prefix}-{max(numbers, default=0) + 1}"
    _run(["git", "tag", tag], workspace)
    return f"recorded the run in {workspace}'s git: commit {head}, tag {tag} (git -C {workspace} show --stat {tag})"


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


def _derived(workspace: Path) -> list[Path]:
    """What the workspace's stages rewrite from its own params, outside DVC's outputs: the GX
    context (validate.gx_dir): suites whose thresholds follow its ``validate:``, and the
    validation definitions that name the suites by id."""
    # Read as plain YAML: a workspace made to test bad settings must still be made.
    validate = YAML(typ="safe").load((workspace / PARAMS_FILE).read_text(encoding="utf-8")).get("validate") or {}
    return [Path(validate.get("gx_dir") or "gx")]


def _under(name: Path, folders: list[Path]) -> bool:
    return any(name == folder or folder in name.parents for folder in folders)


def _staged(workspace: Path) -> bool:
    """True when the index differs from HEAD (or holds anything, before the first commit)."""
    return subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=workspace).returncode != 0


def _head(repo: Path) -> str:
    """The short commit id checked out in ``repo``, or ``(no git)``."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "(no git)"


def _run(command: list[str], cwd: Path, stdin: str | None = None) -> str:
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, input=stdin).stdout
