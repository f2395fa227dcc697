"""Checking and unpacking a dataset archive without trusting it.

A zip is refused before anything is written when an entry is a link, has an absolute path or
climbs out with ``..``, or when the entries add up to more than the size bound (zip bombs).
Extraction goes to a temporary sibling folder that replaces the dataset only when complete.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from finetune.core.config import Checksum
from finetune.core.errors import FetchError
from finetune.core.files import file_digest

# Folders and files that archivers add and that are not data.
_JUNK = re.compile(r"(^|/)(__MACOSX|\.DS_Store|Thumbs\.db)(/|$)")
_SPLITS = ("train", "test")


def matches(path: Path, checksum: Checksum) -> bool:
    """True if ``path`` has the expected digest."""
    return file_digest(path, checksum.algorithm) == checksum.hexdigest


def archive_members(path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The entries to extract (archiver junk left out), after refusing unsafe or oversized ones."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as err:
        raise FetchError(
            f"{path} is not a readable zip archive ({err}): it is truncated or not a zip. Delete "
            "it and fetch again; if it keeps failing, check data.url."
        ) from None
    members = [info for info in infos if not _JUNK.search(info.filename)]
    total = 0
    for info in members:
        _refuse_unsafe(path, info)
        total += info.file_size
        if total > max_bytes:
            raise FetchError(
                f"{path} unpacks to more than {max_bytes / 1e6:.0f} MB (data.max_unpacked_mb): "
                "refused as a possible zip bomb. If the dataset really is that large, raise "
                "data.max_unpacked_mb in params.yaml."
            )
    return members


def _refuse_unsafe(path: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    posix = PurePosixPath(name.replace("\\", "/"))
    if stat.S_ISLNK(info.external_attr >> 16):
        problem = "is a symbolic link"
    elif posix.is_absolute() or re.match(r"^[A-Za-z]:", name):
        problem = "has an absolute path"
    elif ".." in posix.parts:
        problem = "climbs out of the target folder with '..'"
    else:
        return
    raise FetchError(
        f"{path} is unsafe: entry {name!r} {problem}, so it could write outside the dataset "
        "folder. Nothing was extracted. Get the archive from a trusted source (check data.url)."
    )


def extract(path: Path, members: list[zipfile.ZipInfo], into: Path) -> None:
    """Write ``members`` of the zip at ``path`` under ``into`` (which must be empty or absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in members:
                target = into / PurePosixPath(info.filename.replace("\\", "/"))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as err:
        raise FetchError(
            f"{path} is corrupt or truncated: extracting it failed ({err}). Delete it and fetch "
            "again; if it keeps failing, the copy at data.url is damaged."
        ) from None


def dataset_root(extracted: Path) -> Path:
    """The folder holding train/ and test/: the extraction folder or its single top folder."""
    children = [child for child in extracted.iterdir()]
    if len(children) == 1 and children[0].is_dir() and children[0].name not in _SPLITS:
        return children[0]
    return extracted


def require_layout(root: Path, source: Path) -> None:
    """Refuse an archive without the <root>/{train,test}/<class>/ layout."""
    missing = [split for split in _SPLITS if not (root / split).is_dir()]
    if missing:
        found = sorted(child.name for child in root.iterdir())[:10]
        raise FetchError(
            f"{source} does not have the dataset layout <root>/train/<class>/ and "
            f"<root>/test/<class>/: {' and '.join(missing)} missing (top-level entries: {found}). "
            "Repack it in that layout, or point data.url at an archive that has it."
        )


def install(source: Path, target: Path) -> None:
    """Replace ``target`` by the folder ``source`` (same file system) in two renames.

    The previous ``target`` is moved aside first and put back if the second rename fails,
    so at every moment either the old or the new dataset is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    had_previous = target.exists()
    if had_previous:
        os.replace(target, backup)
    try:
        os.replace(source, target)
    except OSError:
        if had_previous:
            os.replace(backup, target)
        raise
    if had_previous:
        shutil.rmtree(backup)
