"""The stack's services as detached processes with pid files and logs under the stack's folder:
started in order (PostgreSQL, the object store, MLflow, Prefect, the worker), each once healthy,
and stopped in reverse order."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.core.config import load_params
from stack.postgres import Postgres, StackError

BUCKET = "finetune"
POOL = "finetune-process"  # prefect.yaml's work pool
S3_REGION = "us-east-1"  # any: the object store has one region
ZOMBIES = Path(__file__).with_name("zombies.yaml")
HEARTBEAT_S = 30  # flow-run heartbeats: a run that misses them for 90 s is marked crashed (zombies.yaml)
# MLflow's users (stack/auth.py): the admin, the one the pipeline and the worker run as, one who only reads.
ADMIN, PIPELINE, READER = "admin", "pipeline", "reader"
# The secrets generated at a stack's first start besides the S3 keys and PostgreSQL's password.
SECRETS = (ADMIN, PIPELINE, READER, "prefect", "flask")


@dataclass(frozen=True)
class Ports:
    """Where each service listens on 127.0.0.1."""

    postgres: int
    s3: int
    mlflow: int
    prefect: int

    @classmethod
    def configured(cls, params_file: Path = Path("params.yaml"), **overrides: int) -> Ports:
        """``ports:`` of params.yaml (MLflow's server on ports.ui), with ``overrides`` by field."""
        p = load_params(params_file).ports
        return cls(**({"postgres": p.postgres, "s3": p.s3, "mlflow": p.ui, "prefect": p.prefect} | overrides))


# The params key (and so the make variable: finetune/ports.py) of each service's port.
PORT_KEYS = {"postgres": "postgres", "s3": "s3", "mlflow": "ui", "prefect": "prefect"}


class Stack:
    """The stack whose state is in ``root`` (``.stack/``), serving ``project`` (the worker's folder)."""

    def __init__(self, root: Path, project: Path, ports: Ports | None = None, objects: Path | None = None) -> None:
        self.root, self.project = root.resolve(), project.resolve()
        saved = self.root / "stack.json"
        state = json.loads(saved.read_text()) if saved.exists() else {}
        # A stack keeps the ports it first started on (its clients' env.sh points there).
        self.ports = ports or (Ports(**state["ports"]) if "ports" in state else
                               Ports.configured(self.project / "params.yaml"))
        self.password = state.get("password") or secrets.token_hex(12)
        # Generated at the first start, kept in stack.json (mode 600) and handed out in env.sh.
        self.s3_key = state.get("s3_key") or f"finetune-{secrets.token_hex(6)}"
        self.s3_secret = state.get("s3_secret") or secrets.token_urlsafe(30)
        # The object store's files: <root>/objects unless another folder was named at the first start.
        self.objects = Path(state.get("objects") or objects or self.root / "objects").resolve()
        self.secrets = {name: state.get("secrets", {}).get(name) or secrets.token_urlsafe(24) for name in SECRETS}
        # Where the services listen: 127.0.0.1 unless STACK_HOST names another address.
        self.host = os.environ.get("STACK_HOST") or "127.0.0.1"
        self.postgres = Postgres(self.root, self.ports.postgres, self.password)

    # -- what clients need ---------------------------------------------------------------
    def urls(self) -> dict[str, str]:
        """Where clients reach each service (PostgreSQL, which only the servers use, stays on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return {"MLflow": f"http://{host}:{self.ports.mlflow}", "Prefect": f"http://{host}:{self.ports.prefect}",
                "S3": f"http://{host}:{self.ports.s3}", "PostgreSQL": f"127.0.0.1:{self.ports.postgres}"}

    def client_env(self) -> dict[str, str]:
        """What a client exports: the two servers, and the object store's keys for `dvc push/pull`."""
        return {"MLFLOW_TRACKING_URI": self.urls()["MLflow"], "PREFECT_API_URL": f"{self.urls()['Prefect']}/api",
                "AWS_ACCESS_KEY_ID": self.s3_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret,
                "AWS_DEFAULT_REGION": S3_REGION} | self.user_env(PIPELINE)

    def user_env(self, user: str) -> dict[str, str]:
        """The credentials of the MLflow user ``user`` and the Prefect API's auth string."""
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.secrets[user],
                "PREFECT_API_AUTH_STRING": self.prefect_auth()}

    def prefect_auth(self) -> str:
        return f"{ADMIN}:{self.secrets['prefect']}"

    def s3_env(self) -> dict[str, str]:
        """What the MLflow server needs to reach the bucket (clients never do: --serve-artifacts)."""
        return {"AWS_ACCESS_KEY_ID": self.s3_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret,
                "AWS_DEFAULT_REGION": S3_REGION, "MLFLOW_S3_ENDPOINT_URL": self.urls()["S3"]}

    def s3_client(self):
        """A boto3 client of the object store, with the stack's keys."""
        import boto3

        return boto3.client("s3", endpoint_url=self.urls()["S3"], region_name=S3_REGION,
                            aws_access_key_id=self.s3_key, aws_secret_access_key=self.s3_secret)

    def process_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                     "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING",
                     "PREFECT_API_KEY"):
            env.pop(name, None)  # a developer's own servers must not leak into the stack's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env | {"PREFECT_HOME": str(self.root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra

    # -- processes -------------------------------------------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def spawn(self, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        """Start ``command`` detached (its own session), output to logs/<name>.log; its pid."""
        for folder in ("run", "logs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        with self.log(name).open("a") as log:
            process = subprocess.Popen(command, env=env, cwd=cwd or self.root, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file(name).write_text(str(process.pid))
        return process.pid

    def running(self, name: str) -> bool:
        try:
            pid = int(self.pid_file(name).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running(name):
                raise StackError(f"{name} exited while starting; its log: {self.log(name)}\n{tail(self.log(name))}")
            try:
                with urllib.request.urlopen(url, timeout=3) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise StackError(f"{name} did not answer {url} within {timeout:.0f} s; its log: {self.log(name)}\n"
                         f"{tail(self.log(name))}")

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal ``name``'s whole process group (a server and its workers), wait for it to go."""
        if not self.running(name):
            self.pid_file(name).unlink(missing_ok=True)
            return
        pid = int(self.pid_file(name).read_text())
        # The group, and children that made sessions of their own (a worker's flow runs).
        tree = [pid, *descendants(pid)]
        for each in tree:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(each, sig) if each == pid else os.kill(each, sig)
        deadline = time.monotonic() + timeout
        while any(alive(each) for each in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for each in tree:
            if alive(each):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGKILL)
        self.pid_file(name).unlink(missing_ok=True)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a child that exited is reaped here, not left a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def save(stack: Stack) -> None:
    """stack.json: the ports, the generated secrets and the objects folder, readable by its owner only."""
    stack.root.mkdir(parents=True, exist_ok=True)
    state = {"ports": asdict(stack.ports), "password": stack.password, "s3_key": stack.s3_key,
             "s3_secret": stack.s3_secret, "objects": str(stack.objects), "secrets": stack.secrets}
    write_private(stack.root / "stack.json", json.dumps(state))


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` with mode 600 from the first byte (never readable by others, even briefly)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    partial.replace(path)
