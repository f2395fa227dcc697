"""Start and stop the whole stack, in order; restart one service (the failure tests use it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from finetune.ports import PortBusy, check_free
from stack.postgres import StackError
from stack.services import BUCKET, HEARTBEAT_S, PORT_KEYS, POOL, ZOMBIES, Stack, save

SERVICES = ("s3", "mlflow", "prefect", "worker")  # detached processes, in start order


def start_s3(stack: Stack) -> None:
    """moto's S3 server (objects in memory while it runs), and the bucket."""
    import boto3

    stack.spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(stack.ports.s3)],
                stack.process_env())
    stack.wait_http("s3", f"{stack.urls()['S3']}/moto-api/", 60)
    env = stack.s3_env()
    client = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


def start_mlflow(stack: Stack) -> None:
    """`mlflow server`: runs and registry in PostgreSQL, artifacts in the bucket, served through it."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(stack.ports.mlflow),
               "--backend-store-uri", stack.postgres.url("mlflow"), "--serve-artifacts",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"]
    # No job runner: its consumers (GenAI scorers) are processes this project never uses.
    stack.spawn("mlflow", command, stack.process_env(**stack.s3_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    stack.wait_http("mlflow", f"{stack.urls()['MLflow']}/health", 240)


def start_prefect(stack: Stack) -> None:
    """`prefect server start` on PostgreSQL, and (once) the automation that marks as crashed a
    flow run whose heartbeats stop (its worker or machine died)."""
    env = stack.process_env(PREFECT_API_DATABASE_CONNECTION_URL=stack.postgres.url("prefect", "postgresql+asyncpg"))
    stack.spawn("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(stack.ports.prefect)], env)
    stack.wait_http("prefect", f"{stack.urls()['Prefect']}/api/health", 300)
    marker = stack.root / "prefect" / "automation-created"
    if not marker.exists():
        done = subprocess.run([sys.executable, "-m", "prefect", "automation", "create", "--from-file", str(ZOMBIES)],
                              env=stack.process_env(PREFECT_API_URL=stack.client_env()["PREFECT_API_URL"]),
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
    """Delete the stack's state (stopped first): its folder, and PostgreSQL's data where it lives
    outside it (postgres.cluster_folder)."""
    down(stack)
    cluster = stack.root / "postgres"
    if cluster.is_symlink():
        shutil.rmtree(cluster.resolve(), ignore_errors=True)
    shutil.rmtree(stack.root, ignore_errors=True)
