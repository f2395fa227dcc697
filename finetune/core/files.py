"""File helpers shared by every layer: atomic writes, file digests and settings fingerprints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune.core.errors import WriteError


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    Readers see the old file or the whole new one, never a half-written file; if ``write``
    fails, ``path`` is left as it was and the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        failure = _write_error(path, err)
        if failure is None:
            raise
        raise failure from err
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except Exception as err:
        failure = _write_error(path, _cause(err, (tmp, path)))
        if failure is None:
            raise
        raise failure from err
    finally:
        tmp.unlink(missing_ok=True)


def _cause(err: BaseException, paths: tuple[Path, ...]) -> OSError | None:
    """The OSError behind ``err`` (itself, or one it was raised from or while handling) about
    ``paths`` (or about no file): libraries such as torch wrap a full disk in errors of their own."""
    names = {str(p) for p in paths}
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and (seen.filename is None or str(seen.filename) in names):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# errno → what to do (formatted with the folder and the user).
_FIXES = {
    errno.EACCES: "give {user} write access to {folder} (chown, or chmod u+w), or run the project from a "
                  "copy of it that this user owns",
    errno.EROFS: "{folder} is on a read-only file system: remount it read-write, or run the project from a "
                 "writable copy",
    errno.ENOSPC: "free space on the disk of {folder} (df -h {folder}; old DVC cache entries: dvc gc), then "
                  "rerun",
    errno.ENOTDIR: "{blocker} is a file where a folder is expected: move it away, then rerun",
}
_FIXES |= {errno.EPERM: _FIXES[errno.EACCES], errno.EDQUOT: _FIXES[errno.ENOSPC], errno.EFBIG: _FIXES[errno.ENOSPC],
           errno.EEXIST: _FIXES[errno.ENOTDIR]}


def _write_error(path: Path, cause: OSError | None) -> WriteError | None:
    """A WriteError ("cannot write <path>: <reason>; <fix>") for a failure the user can fix, else None."""
    code = cause.errno if cause is not None else None
    if code not in _FIXES:
        try:  # torch.save to a path hides a full disk in its own error: the disk says it
            full = shutil.disk_usage(path.parent).free == 0
        except OSError:
            full = False
        if not full:
            return None
        code = errno.ENOSPC
    user = f"the user running this (uid {os.geteuid()})" if hasattr(os, "geteuid") else "this user"
    blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
    fix = _FIXES[code].format(folder=path.parent, user=user, blocker=blocker)
    return WriteError(f"cannot write {path}: {os.strerror(code)}; {fix}")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_of(*parts: object) -> str:
    """A short digest of JSON-able settings: equal settings, equal fingerprint."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
