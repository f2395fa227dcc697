"""Where a result came from: the DVC version of a dataset and the git commit of the code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(project: Path) -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown``.

    The pipeline's own state (dvc.lock and the outputs it records) does not count: the stages
    rewrite it while the pipeline runs, so a run from a clean commit that versions dvc.lock
    (DVC's advice; the demo does) would otherwise call itself dirty."""
    state = [f":(exclude){path}" for path in ["dvc.lock", *_recorded_outs(project)]]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *state],
                               cwd=project, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _recorded_outs(project: Path) -> list[str]:
    """Every output path dvc.lock records (datasets, models, metrics, plots, reports)."""
    try:
        stages = _lock_stages(project)
        return [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):  # not DVC's: nothing to leave out
        return []


def _lock_stages(project: Path) -> dict:
    """dvc.lock's ``stages`` ({} without a dvc.lock), parsed by libyaml where PyYAML has it (a
    whole pipeline's lock file takes the pure-Python parser a tenth of a second)."""
    lock = project / "dvc.lock"
    if not lock.exists():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {})


def data_version(project: Path, dataset: Path) -> str:
    """The DVC hash of ``dataset`` as dvc.lock records it (the fetch stage's output), or ``unknown``."""
    stages = _lock_stages(project)
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == dataset:
                return out.get("md5", "unknown")
    return "unknown"
