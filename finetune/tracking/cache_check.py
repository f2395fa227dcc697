"""doctor's check of the DVC cache: every object that dvc.lock's data dir and model outputs need
(for a directory output, its ``.dir`` manifest and each file it lists) is present and has the
MD5 its name says (DVC's hash of a file is the MD5 of its bytes; a ``.dir`` object is the MD5 of
the manifest's own bytes, plus ``.dir``).

Checked by hashing here, never with `dvc status`: that command deletes a corrupted object
without a word, and `dvc checkout` then restores nothing. Each damaged output gets the repair
that works for it: `dvc commit --force <stage>` when the workspace copy still matches dvc.lock
(no network, no retraining); else `dvc fetch`/`dvc checkout` from the default remote; else
`dvc repro --force` of the stage that makes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

CHUNK = 1 << 20
SHOWN = 3  # damaged objects named in a problem line


@dataclass(frozen=True)
class Damage:
    """One dvc.lock output with missing or corrupted cache objects, and its repair."""

    stage: str
    path: str
    missing: list[str]
    corrupted: list[str]
    repair: str

    def problem(self) -> str:
        parts = [f"{len(found)} {what} ({', '.join(found[:SHOWN])}{', ...' if len(found) > SHOWN else ''})"
                 for what, found in (("missing", self.missing), ("corrupted", self.corrupted)) if found]
        return (f"the DVC cache of {self.path} (stage {self.stage} in dvc.lock) has {' and '.join(parts)} "
                "object(s): `dvc checkout` cannot restore it, and `dvc push` would not send it")


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_md5(folder: Path) -> str:
    """DVC's hash of a folder: the MD5 of its manifest (each file's MD5 and path, sorted)."""
    # Sorted by path parts, as DVC sorts them ("a/b" before "a-b", unlike a plain string sort).
    entries = sorted((p.relative_to(folder).parts, md5_of(p)) for p in folder.rglob("*") if p.is_file())
    text = json.dumps([{"md5": md5, "relpath": "/".join(parts)} for parts, md5 in entries])
    return hashlib.md5(text.encode()).hexdigest() + ".dir"


def cache_settings(project: Path) -> tuple[Path, str | None]:
    """The cache's md5 folder and the default remote's name (DVC's own reading of its config)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return Path(repo.cache.local.path), repo.config["core"].get("remote")


def damaged(project: Path, data_dir: str) -> list[Damage]:
    """Every output of dvc.lock under ``data_dir`` or models/ whose cache objects are damaged."""
    lock = project / "dvc.lock"
    if not lock.is_file() or not (project / ".dvc").is_dir():
        return []
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    outs = [(stage, out) for stage, entry in stages.items() for out in entry.get("outs") or []
            if out.get("md5") and (out["path"] == str(data_dir) or out["path"].startswith("models/"))]
    if not outs:
        return []
    cache, remote = cache_settings(project)
    found = []
    for stage, out in outs:
        missing, corrupted = check_object(cache, out["md5"])
        if missing or corrupted:
            found.append(Damage(stage, out["path"], missing, corrupted,
                                repair(project, stage, out["path"], out["md5"], remote)))
    return found


def object_path(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def check_object(cache: Path, md5: str) -> tuple[list[str], list[str]]:
    """(missing, corrupted) cache files of the object ``md5`` (a ``.dir``: with its files)."""
    path = object_path(cache, md5)
    if not path.is_file():
        return [str(path)], []
    if md5_of(path) != md5.removesuffix(".dir"):
        return [], [str(path)]
    if not md5.endswith(".dir"):
        return [], []
    missing, corrupted = [], []
    for md5 in dict.fromkeys(entry["md5"] for entry in json.loads(path.read_text())):  # same bytes, one object
        file = object_path(cache, md5)
        if not file.is_file():
            missing.append(str(file))
        elif md5_of(file) != md5:
            corrupted.append(str(file))
    return missing, corrupted


def repair(project: Path, stage: str, path: str, md5: str, remote: str | None) -> str:
    """The command that restores the objects: from the workspace copy when it still matches
    dvc.lock, else from the default remote, else by running the stage again."""
    copy = project / path
    intact = (copy.is_dir() and manifest_md5(copy) == md5) or (copy.is_file() and md5_of(copy) == md5)
    if intact:
        return f"dvc commit --force {stage} (the workspace copy of {path} still matches dvc.lock: it refills the cache)"
    again = f"dvc repro --force --single-item {stage}"
    if remote:
        return (f"dvc fetch {stage} && dvc checkout {stage} (from the remote {remote!r}; if it lacks them too: "
                f"{again})")
    return f"{again} (no DVC remote is configured to fetch them from)"
