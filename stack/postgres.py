"""PostgreSQL as a private cluster in a folder: the distribution's server binaries (initdb,
pg_ctl), no system service. PostgreSQL refuses to run as root, so as root the cluster belongs to
the ``postgres`` user that the Debian package creates."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

SUPERUSER = "finetune"
DATABASES = ("mlflow", "prefect", "mlflow_auth")  # the last: the MLflow server's users (stack/auth.py)
# MLflow's SQLAlchemy driver, named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which
# the stack does not install (psycopg2-binary is its driver).
MLFLOW_DRIVER = "postgresql+psycopg2"
INSTALL_HINT = ("install the PostgreSQL server package (Debian/Ubuntu: `apt-get install postgresql`; "
                "macOS: `brew install postgresql`) or put the folder holding pg_ctl and initdb on PATH")


class StackError(RuntimeError):
    """A service of the stack could not be started; the message says which and what to do."""


def binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    usable = [Path(f) for f in folders if (Path(f) / "pg_ctl").exists() and (Path(f) / "initdb").exists()]
    return usable[-1] if usable else None


def ensure_binaries(say=print) -> Path:
    """initdb and pg_ctl, installed with apt-get (as root, where there is apt-get) if missing."""
    found = binaries()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(f"PostgreSQL's server binaries (initdb, pg_ctl) are not installed: {INSTALL_HINT}.")
    say("installing the PostgreSQL server binaries (apt-get install postgresql) ...")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"`{' '.join(command)}` failed (exit {done.returncode}), so PostgreSQL is missing: "
                             f"{INSTALL_HINT}.\n{done.stderr.strip()[-800:]}")
    found = binaries()
    if not found:
        raise StackError(f"apt-get installed postgresql but no pg_ctl/initdb was found: {INSTALL_HINT}.")
    return found


def owner() -> str | None:
    """The user the cluster runs as: None (this one), or ``postgres`` when this is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as err:
        raise StackError("PostgreSQL does not run as root and there is no `postgres` user: create one "
                         "(`useradd --system postgres`) or run `make stack` as an ordinary user.") from err
    return "postgres"


def as_owner(command: list[str], user: str | None) -> list[str]:
    """``command`` run as the cluster's owner."""
    return command if user is None else ["runuser", "-u", user, "--", *command]


def reachable(path: Path, user: str | None) -> bool:
    """Whether ``user`` may create files in ``path`` (every folder above it must let it through)."""
    if user is None:
        return True
    return subprocess.run(as_owner(["test", "-w", str(path)], user)).returncode == 0


def cluster_folder(root: Path, user: str | None) -> Path:
    """``<root>/postgres``: as root, owned by ``postgres``; where that user cannot reach the
    stack's folder (a home folder closed to others, pytest's temporary folders), a link to a
    folder under /var/tmp named after it."""
    folder = root / "postgres"
    if folder.exists() or folder.is_symlink():
        return folder.resolve()
    folder.mkdir(parents=True)
    if user is None:
        return folder
    shutil.chown(folder, user, user)
    if reachable(folder, user):
        return folder
    folder.rmdir()
    outside = Path("/var/tmp") / f"finetune-stack-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}"
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir(mode=0o700, parents=True)
    shutil.chown(outside, user, user)
    folder.symlink_to(outside)
    return outside


class Postgres:
    """The private cluster under ``<root>/postgres`` on 127.0.0.1:``port``."""

    def __init__(self, root: Path, port: int, password: str) -> None:
        self.root, self.port, self.password = root, port, password
        self.user = owner()
        self.bin: Path | None = None

    @property
    def data(self) -> Path:
        return (self.root / "postgres").resolve() / "data"

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL of ``database``: plain for libpq (psycopg2.connect); SQLAlchemy users name
        their driver (:data:`MLFLOW_DRIVER`, ``postgresql+asyncpg`` for Prefect)."""
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def pg(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.bin is not None
        return subprocess.run(as_owner([str(self.bin / name), *args], self.user), capture_output=True, text=True,
                              cwd="/")

    def init(self) -> None:
        """initdb once: superuser ``finetune`` with the stack's password, passwords over TCP."""
        self.bin = ensure_binaries()
        folder = cluster_folder(self.root, self.user)
        if (self.data / "PG_VERSION").exists():
            return
        secret = folder / "password"
        secret.write_text(self.password + "\n")
        if self.user:
            shutil.chown(secret, self.user, self.user)
        done = self.pg("initdb", "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(secret), "-E", "UTF8",
                       "--auth-host=scram-sha-256", "--auth-local=peer", "--no-instructions")
        secret.unlink()
        if done.returncode != 0:
            raise StackError(f"initdb failed for {self.data}:\n{done.stdout[-800:]}{done.stderr[-800:]}")

    def start(self) -> None:
        """pg_ctl start on 127.0.0.1 only (no Unix socket outside the cluster's folder)."""
        self.bin = self.bin or ensure_binaries()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data}"
        done = self.pg("pg_ctl", "-D", str(self.data), "-l", str(self.data.parent / "server.log"),
                       "-o", options, "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = self.data.parent / "server.log"
            tail = log.read_text()[-1500:] if log.exists() else ""
            raise StackError(f"PostgreSQL did not start on 127.0.0.1:{self.port} (is the port taken?): "
                             f"{done.stderr.strip()}\n{tail}")
        self.create_databases()

    def running(self) -> bool:
        """Whether the cluster's server runs (pg_ctl status; a pid file left by a crash is not)."""
        if not (self.data / "postmaster.pid").exists():
            return False
        self.bin = self.bin or ensure_binaries()
        return self.pg("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (nothing to do when it is not running)."""
        if self.running():
            self.pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop and start again, on the same data and port."""
        self.stop()
        self.start()

    def create_databases(self) -> None:
        """The databases of the MLflow server (runs, users) and the Prefect server, created once."""
        import psycopg2

        deadline = time.monotonic() + 30
        while True:
            try:
                connection = psycopg2.connect(self.url("postgres"), connect_timeout=3)
                break
            except psycopg2.OperationalError as err:
                if time.monotonic() > deadline:
                    raise StackError(f"PostgreSQL on 127.0.0.1:{self.port} refuses the stack's connection: "
                                     f"{str(err).strip()}. Is another server on that port? See "
                                     f"{self.data.parent / 'server.log'}") from err
                time.sleep(0.5)
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in DATABASES:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
