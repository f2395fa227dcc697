"""The fetch stage: archive at data.url → verified → safely extracted → data.dir, atomically.

Any failure raises FetchError and leaves the dataset at data.dir exactly as it was.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finetune.core.config import DataConfig
from finetune.core.errors import FetchError
from finetune.core.files import file_digest
from finetune.ingest.archive import (
    archive_members,
    dataset_root,
    extract,
    install,
    matches,
    require_layout,
)
from finetune.ingest.download import RetryPolicy, archive_name, download, is_remote, local_path, looks_like_html

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    """What a fetch produced: the verified archive and the dataset folder it became."""

    archive: Path
    dataset: Path
    sha256: str
    files: int
    bytes: int


def fetch(cfg: DataConfig, workdir: Path = Path(".")) -> FetchResult:
    """Obtain and verify the archive named by ``cfg.url``, then install it at ``cfg.dir``."""
    archive = obtain_archive(cfg, workdir)
    members = archive_members(archive, int(cfg.max_unpacked_mb * 1e6))
    target = workdir / cfg.dir
    _recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        extract(archive, members, staging)
        root = dataset_root(staging)
        require_layout(root, archive)
        install(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = [path for path in target.rglob("*") if path.is_file()]
    result = FetchResult(archive, target, file_digest(archive, "sha256"), len(files),
                         sum(path.stat().st_size for path in files))
    log.info("dataset ready at %s: %d files, %.1f MB (archive sha256:%s)",
             target, result.files, result.bytes / 1e6, result.sha256)
    return result


def needs_download(cfg: DataConfig, workdir: Path = Path(".")) -> bool:
    """True when a fetch must download: data.url is remote, and neither the dataset nor a
    downloaded archive is here yet (a fresh clone)."""
    archive = workdir / cfg.downloads / archive_name(cfg.url)
    return is_remote(cfg.url) and not (workdir / cfg.dir).exists() and not archive.is_file()


def obtain_archive(cfg: DataConfig, workdir: Path) -> Path:
    """A verified local copy of the archive: downloaded (or reused) for URLs, as is for paths."""
    if not is_remote(cfg.url):
        path = workdir / local_path(cfg.url)
        if not path.is_file():
            raise FetchError(
                f"data.url points at {path}, which does not exist. Copy the archive there, or "
                "fix data.url in params.yaml (a plain path, or file:///absolute/path)."
            )
        _verify(cfg, path, delete=False)  # a user's mirror is theirs: never delete it
        return path
    dest = workdir / cfg.downloads / archive_name(cfg.url)
    if dest.is_file() and cfg.checksum and matches(dest, cfg.checksum):
        log.info("using %s, already downloaded and verified (%s)", dest, cfg.checksum)
        return dest
    policy = RetryPolicy(cfg.timeout_s, cfg.retries, cfg.backoff_s)
    resumed = download(cfg.url, dest, policy)
    if resumed and cfg.checksum and not matches(dest, cfg.checksum):
        # The server's file may have changed between attempts: one clean download decides.
        log.warning("the resumed download of %s failed verification; downloading it again", cfg.url)
        dest.unlink()
        download(cfg.url, dest, policy)
    _verify(cfg, dest, delete=True)
    return dest


def _verify(cfg: DataConfig, path: Path, delete: bool) -> None:
    """Check the archive against data.checksum (or, unpinned, that it is no web page).

    On failure explain what the file is instead, and delete it if it was our download.
    """
    if cfg.checksum is None:
        if not looks_like_html(path):
            log.warning("data.checksum is null, so %s is not verified; to pin this file set "
                        "data.checksum: sha256:%s", path, file_digest(path, "sha256"))
            return
        problem = f"{path} ({cfg.url}) is {_diagnosis(path)}, not a zip archive."
    else:
        actual = file_digest(path, cfg.checksum.algorithm)
        if actual == cfg.checksum.hexdigest:
            log.info("verified %s (%s)", path, cfg.checksum)
            return
        problem = (f"Checksum mismatch for {cfg.url}: expected {cfg.checksum}, got "
                   f"{cfg.checksum.algorithm}:{actual} ({path.stat().st_size} bytes; it is "
                   f"{_diagnosis(path)}). If the dataset changed on purpose, set data.checksum "
                   "to the new value.")
    if delete:
        path.unlink()
    kept = "The download was deleted." if delete else f"{path} was left in place."
    raise FetchError(f"{problem} {kept} {_URL_HINT}")


_URL_HINT = ("Check data.url in params.yaml: it must point at the zip itself, not at a web page "
             "about it; then fetch again.")


def _diagnosis(path: Path) -> str:
    """What a file that is not the expected archive looks like, in words."""
    if looks_like_html(path):
        return "an HTML page (an error, login or moved-file page)"
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if zipfile.is_zipfile(path):
        return "a zip archive, but not the expected one"
    if starts_like_zip:
        return "a truncated zip archive (it starts like one but its end is missing)"
    return "not a zip archive"


def _recover(target: Path) -> None:
    """Undo what a fetch killed half-way left behind, restoring a dataset caught mid-swap."""
    backups = sorted(target.parent.glob(f".{target.name}.old-*"))
    if backups and not target.exists():
        log.warning("restoring %s from %s, left by an interrupted fetch", target, backups[-1])
        backups[-1].rename(target)
        backups.pop()
    for leftover in [*backups, *target.parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
