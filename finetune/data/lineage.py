"""Where a result came from: the DVC version of a dataset and the git commit of the code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(project: Path) -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def data_version(project: Path, dataset: Path) -> str:
    """The DVC hash of ``dataset`` as dvc.lock records it (the fetch stage's output), or ``unknown``."""
    lock = project / "dvc.lock"
    if not lock.exists():
        return "unknown"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == dataset:
                return out.get("md5", "unknown")
    return "unknown"
