"""Start and stop the whole stack, in order; restart one service (the failure tests use it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from finetune.ports import PortBusy, check_free
from stack import auth, objectstore
from stack.postgres import MLFLOW_DRIVER, StackError
from stack.services import BUCKET, HEARTBEAT_S, PORT_KEYS, POOL, ZOMBIES, Stack, save

SERVICES = ("s3", "mlflow", "prefect", "worker")  # detached processes, in start order


def start_s3(stack: Stack) -> None:
    """The object store (s3rver, objects as files in stack.objects), with the bucket."""
    prefix = stack.root / "s3rver"
    objectstore.install(prefix)
    env = stack.process_env(S3RVER_PREFIX=str(prefix), S3_DIRECTORY=str(stack.objects), S3_HOST=stack.host,
                            S3_PORT=str(stack.ports.s3), S3_BUCKET=BUCKET, S3_ACCESS_KEY_ID=stack.s3_key,
                            S3_SECRET_ACCESS_KEY=stack.s3_secret)
    stack.spawn("s3", objectstore.command(), env)
    stack.wait_http("s3", f"{stack.urls()['S3']}/_stack/health", 60)


def start_mlflow(stack: Stack) -> None:
    """`mlflow server` with its basic-auth app: runs and registry in PostgreSQL, artifacts in the
    bucket, served through it; then its users (stack/auth.py)."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", stack.host, "--port", str(stack.ports.mlflow),
               "--backend-store-uri", stack.postgres.url("mlflow", MLFLOW_DRIVER), "--serve-artifacts",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1", "--app-name", "basic-auth"]
    if stack.host != "127.0.0.1":  # MLflow answers only the Host headers it allows (DNS rebinding)
        command += ["--allowed-hosts", f"localhost:*,127.0.0.1:*,{stack.host}:*"]
    # No job runner: its consumers (GenAI scorers) are processes this project never uses.
    env = stack.process_env(**stack.s3_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                            MLFLOW_AUTH_CONFIG_PATH=str(auth.config(stack)),
                            MLFLOW_FLASK_SERVER_SECRET_KEY=stack.secrets["flask"])
    stack.spawn("mlflow", command, env)
    stack.wait_http("mlflow", f"{stack.urls()['MLflow']}/health", 240)
    auth.ensure_users(stack)
    auth.grant_pipeline(stack)


def start_prefect(stack: Stack) -> None:
    """`prefect server start` on PostgreSQL, and (once) the automation that marks as crashed a
    flow run whose heartbeats stop (its worker or machine died)."""
    env = stack.process_env(PREFECT_API_DATABASE_CONNECTION_URL=stack.postgres.url("prefect", "postgresql+asyncpg"),
                            PREFECT_SERVER_API_AUTH_STRING=stack.prefect_auth())
    stack.spawn("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", stack.host,
                            "--port", str(stack.ports.prefect)], env)
    stack.wait_http("prefect", f"{stack.urls()['Prefect']}/api/health", 300)
    marker = stack.root / "prefect" / "automation-created"
    if not marker.exists():
        done = subprocess.run([sys.executable, "-m", "prefect", "automation", "create", "--from-file", str(ZOMBIES)],
                              env=stack.process_env(**stack.client_env()),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"could not create the crashed-run automation ({ZOMBIES}):\n{done.stdout}{done.stderr}")
        marker.write_text("")


def start_worker(stack: Stack, timeout: float = 120) -> None:
    """A process worker on the project's pool, in the project's folder, with the client's variables
    (its flow runs train, log to MLflow and push to the bucket) and flow-run heartbeats."""
    env = stack.process_env(**stack.client_env(), FINETUNE_PROJECT=str(stack.project),
                            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    log = stack.log("worker")
    start = log.stat().st_size if log.exists() else 0
    stack.spawn("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                env, cwd=stack.project)
    deadline = time.monotonic() + timeout
    while "started!" not in log.read_text(errors="replace")[start:]:
        if not stack.running("worker") or time.monotonic() > deadline:
            raise StackError(f"the Prefect worker did not start; its log: {log}\n{log.read_text()[start:][-1500:]}")
        time.sleep(0.5)


def free_ports(stack: Stack) -> None:
    """StackError naming the make variable when a service that is not running would find its port taken."""
    running = {"postgres": stack.postgres.running()} | {name: stack.running(name) for name in ("s3", "mlflow", "prefect")}
    for name, key in PORT_KEYS.items():
        if not running[name]:
            try:
                check_free(key, getattr(stack.ports, name))
            except PortBusy as err:
                raise StackError(f"{name}: {err}") from None


def up(stack: Stack, say=print) -> float:
    """Start every service that is not running; the seconds it took."""
    started = time.monotonic()
    free_ports(stack)
    objectstore.tools()  # node and npm are missing: say so before anything starts
    save(stack)
    stack.postgres.init()
    if not stack.postgres.running():
        stack.postgres.start()
    else:
        stack.postgres.create_databases()  # running already: check that it answers
    say(f"  PostgreSQL   127.0.0.1:{stack.ports.postgres} ({stack.postgres.data})")
    for name, start in (("s3", start_s3), ("mlflow", start_mlflow), ("prefect", start_prefect),
                        ("worker", start_worker)):
        if not stack.running(name):
            start(stack)
        say(f"  {name:<12} up ({stack.log(name)})")
    return time.monotonic() - started


def down(stack: Stack) -> None:
    """Stop the services in reverse order; their state (PostgreSQL's data) stays in the folder."""
    for name in reversed(SERVICES):
        stack.kill(name)
    stack.postgres.stop()


def purge(stack: Stack) -> None:
    """Delete the stack's state (stopped first): its folder, and PostgreSQL's data and the
    object store's files where they live outside it (postgres.cluster_folder, --objects)."""
    down(stack)
    cluster = stack.root / "postgres"
    if cluster.is_symlink():
        shutil.rmtree(cluster.resolve(), ignore_errors=True)
    if not stack.objects.is_relative_to(stack.root):
        shutil.rmtree(stack.objects, ignore_errors=True)
    shutil.rmtree(stack.root, ignore_errors=True)
