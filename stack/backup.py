"""`make stack-backup` / `make stack-restore FILE=...`: one archive (``.tar.gz``) holding both
PostgreSQL databases (pg_dump's custom format) and the object store's files, and the restore of
such an archive into a fresh stack folder (its own ports and newly generated secrets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from stack import objectstore
from stack.lifecycle import SERVICES, up
from stack.postgres import DATABASES, SUPERUSER, StackError, ensure_binaries
from stack.services import ADMIN, PIPELINE, READER, Stack, save

FORMAT = 1  # manifest.json's "format": what this code writes and reads
# The passwords stored (hashed) in the mlflow_auth database: they come back with it. The stack's
# other secrets (S3 keys, PostgreSQL's password, Prefect's auth string) are the restored stack's own.
USERS = (ADMIN, PIPELINE, READER)
DEFAULT_FOLDER = Path("stack-backups")


def pg_tool(stack: Stack, name: str, *args: str) -> None:
    """pg_dump / pg_restore over TCP with the stack's password; StackError with its output on failure."""
    command = [str(ensure_binaries() / name), "-h", "127.0.0.1", "-p", str(stack.ports.postgres), "-U", SUPERUSER, *args]
    done = subprocess.run(command, env=os.environ | {"PGPASSWORD": stack.password}, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"`{name} {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr.strip()[-1200:]}")


def backup(stack: Stack, archive: Path | None = None, say=print) -> Path:
    """Write one archive of the stack's databases and objects; its path. PostgreSQL must run (the
    stack is up); the object store's files are read as they are, so back up while no run writes."""
    if not (stack.root / "stack.json").exists():
        raise StackError(f"there is no stack in {stack.root} to back up: start one with `make stack` (or name "
                         "its folder with --root).")
    if not stack.postgres.running():
        raise StackError(f"the stack's PostgreSQL in {stack.root} is not running, and pg_dump needs it: run "
                         "`make stack` first, then `make stack-backup` again.")
    started = time.monotonic()
    archive = (archive or DEFAULT_FOLDER / f"stack-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.tar.gz").resolve()
    archive.parent.mkdir(parents=True, exist_ok=True)
    objects, size = objectstore.count(stack.objects)
    manifest = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "databases": list(DATABASES), "objects": objects, "object_bytes": size,
                "object_store": f"s3rver {objectstore.VERSION}"}
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".stack-backup-") as scratch:
        for database in DATABASES:
            pg_tool(stack, "pg_dump", "-Fc", "-d", database, "-f", str(Path(scratch) / f"{database}.dump"))
        (Path(scratch) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (Path(scratch) / "users.json").write_text(json.dumps({user: stack.secrets[user] for user in USERS}))
        partial = Path(scratch) / "archive.tar.gz"
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(Path(scratch) / "manifest.json", "manifest.json")
            tar.add(Path(scratch) / "users.json", "users.json")
            for database in DATABASES:
                tar.add(Path(scratch) / f"{database}.dump", f"{database}.dump")
            if stack.objects.exists():
                tar.add(stack.objects, "objects")
        partial.replace(archive)  # never a half-written archive under the final name
    archive.chmod(0o600)  # it holds every run and model, like the stack's folder
    say(f"Backed up {stack.root} ({len(DATABASES)} databases, {objects} objects, {size / 1e6:.1f} MB) to {archive} "
        f"({archive.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s).")
    return archive


def read_manifest(archive: Path) -> dict:
    """The archive's manifest; StackError naming the file and the fix when it is not a stack backup."""
    hint = "name an archive that `make stack-backup` wrote (stack-backups/stack-<date>.tar.gz)"
    if not archive.is_file():
        raise StackError(f"{archive}: no such file; {hint}.")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = set(tar.getnames())
            manifest = json.load(tar.extractfile("manifest.json")) if "manifest.json" in names else None
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as err:
        raise StackError(f"{archive} is not a readable stack backup ({err}); {hint}.") from None
    missing = [f"{name}.dump" for name in DATABASES if f"{name}.dump" not in names]
    if manifest is None or manifest.get("format") != FORMAT or missing:
        what = "has no manifest.json" if manifest is None else (
            f"is of format {manifest.get('format')!r}, this code reads {FORMAT}" if manifest.get("format") != FORMAT
            else f"lacks {', '.join(missing)}")
        raise StackError(f"{archive} {what}, so it is not a stack backup this code can restore; {hint}.")
    return manifest


def fresh(stack: Stack) -> None:
    """StackError unless ``stack``'s folder holds no data to overwrite (restore never deletes)."""
    running = [name for name in SERVICES if stack.running(name)] + (["postgres"] if stack.postgres.running() else [])
    has_data = (stack.postgres.data / "PG_VERSION").exists() or objectstore.count(stack.objects)[0] > 0
    if running or has_data:
        state = f"runs {', '.join(running)}" if running else "already holds a stack's data"
        raise StackError(f"{stack.root} {state}; a restore only fills a fresh stack folder, so that nothing is "
                         "overwritten. Restore into another folder (`python -m stack restore --root NEW --file ...`), "
                         "or, if that stack's data may go, `make stack-down PURGE=1` first.")


def restore(stack: Stack, archive: Path, say=print) -> float:
    """Fill the fresh ``stack`` from ``archive`` and start it; the seconds it took."""
    manifest = read_manifest(archive)
    fresh(stack)
    started = time.monotonic()
    with tarfile.open(archive, "r:gz") as tar:
        users = json.load(tar.extractfile("users.json")) if "users.json" in tar.getnames() else {}
    stack.secrets |= {user: users[user] for user in USERS if user in users}
    save(stack)
    stack.postgres.init()
    stack.postgres.start()  # creates the two (empty) databases
    with tempfile.TemporaryDirectory(dir=stack.root, prefix=".restore-") as scratch:
        with tarfile.open(archive, "r:gz") as tar:
            for database in DATABASES:
                tar.extract(f"{database}.dump", scratch, filter="data")
            members = [m for m in tar.getmembers() if m.name == "objects" or m.name.startswith("objects/")]
            tar.extractall(scratch, members=members, filter="data")
        for database in DATABASES:
            pg_tool(stack, "pg_restore", "--no-owner", "--exit-on-error", "-d", database,
                    str(Path(scratch) / f"{database}.dump"))
        if (Path(scratch) / "objects").exists():
            if stack.objects.exists():
                shutil.rmtree(stack.objects)  # holds no object (fresh() checked): at most empty folders
            stack.objects.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(scratch) / "objects", stack.objects)
    # The crashed-run automation came back with the Prefect database: do not create a second.
    (stack.root / "prefect").mkdir(parents=True, exist_ok=True)
    (stack.root / "prefect" / "automation-created").write_text("")
    say(f"Restored {manifest['objects']} objects and the databases {', '.join(DATABASES)} from {archive} "
        f"(written {manifest['created']}) into {stack.root}; starting the stack ...")
    up(stack, say)
    return time.monotonic() - started
