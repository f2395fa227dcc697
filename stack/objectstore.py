"""The stack's S3 object store: s3rver (npm, pinned with its whole dependency tree in
stack/s3rver/package-lock.json), installed at the first `make stack` into ``<root>/s3rver/`` and
run by stack/s3rver/server.js, which keeps every object as a file under the stack's objects
folder (``<root>/objects/`` unless ``--objects`` named another at the first start)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

from stack.postgres import StackError

SOURCE = Path(__file__).with_name("s3rver")  # package.json, package-lock.json, server.js
VERSION = "3.7.1"
NODE_HINT = ("install Node.js 18 or newer with npm (Debian/Ubuntu: `apt-get install nodejs npm`; "
             "macOS: `brew install node`), or put the folder holding node and npm on PATH")


def tools() -> tuple[str, str]:
    """The paths of node and npm; StackError naming the fix when either is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        raise StackError(f"the object store (s3rver {VERSION}, an npm package) needs {missing}, which is not on "
                         f"PATH: {NODE_HINT}; then run `make stack` again.")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        raise StackError(f"the object store needs Node.js 18 or newer, and {node} is {version or 'unknown'}: "
                         f"{NODE_HINT}; then run `make stack` again.")
    return node, npm


def installed(prefix: Path) -> bool:
    """Whether ``prefix`` holds the locked s3rver (its lock file is the one in stack/s3rver/)."""
    lock = prefix / "package-lock.json"
    return ((prefix / "node_modules" / "s3rver" / "package.json").exists() and lock.exists()
            and filecmp.cmp(lock, SOURCE / "package-lock.json", shallow=False))


def install(prefix: Path, say=print) -> None:
    """`npm ci` of stack/s3rver/package-lock.json into ``prefix`` (once; again when the lock changes)."""
    _, npm = tools()
    if installed(prefix):
        return
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(SOURCE / name, prefix / name)
    say(f"  installing s3rver {VERSION} into {prefix} (npm ci) ...")
    try:
        done = subprocess.run([npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=prefix,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise StackError(f"`npm ci` in {prefix} did not finish within 600 s: is the npm registry reachable? "
                         "Run `make stack` again once it is.") from None
    if done.returncode != 0:
        (prefix / "package-lock.json").unlink(missing_ok=True)  # so that the next start tries again
        raise StackError(f"`npm ci` could not install s3rver {VERSION} into {prefix} (exit {done.returncode}); "
                         f"check that the npm registry is reachable, then run `make stack` again.\n"
                         f"{(done.stdout + done.stderr).strip()[-800:]}")


def command() -> list[str]:
    """The object store's command line (its settings come in the environment: server.js)."""
    node, _ = tools()
    # s3rver encrypts ListObjectsV2's continuation tokens with DES, which OpenSSL 3 keeps in its
    # legacy provider: without it every listing longer than one page answers 500.
    return [node, "--openssl-legacy-provider", str(SOURCE / "server.js")]


def count(objects: Path) -> tuple[int, int]:
    """The number of stored objects under ``objects`` and their bytes (s3rver's files)."""
    files = [path for path in objects.rglob("*._S3rver_object")] if objects.exists() else []
    return len(files), sum(path.stat().st_size for path in files)
