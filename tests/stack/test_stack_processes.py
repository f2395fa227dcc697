"""The stack's plumbing without its servers (seconds): what `python -m stack env` tells a client,
a stop that finds nothing running, a service's whole process tree stopped (a worker's flow runs
start sessions of their own), and where PostgreSQL's data goes when it runs as `postgres`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from finetune.core.config import load_params
from stack.postgres import cluster_folder, owner
from stack.services import Ports, Stack, alive, descendants


def stack_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stack", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_env_prints_the_exports_a_client_needs(tmp_path):
    done = stack_cli("env", "--root", str(tmp_path / "stack"))
    assert done.returncode == 0, done.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())
    ports = load_params(REPO / "params.yaml").ports  # the stack's ports are params.yaml's ports:
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports.ui}"
    assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports.prefect}/api"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= exports.keys()  # for dvc push/pull only


def test_a_taken_port_is_refused_in_one_line_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = stack_cli("up", "--root", str(tmp_path / "stack"), "--port", f"s3={port}")
    assert done.returncode == 1
    assert done.stderr.strip() == (f"make stack: s3: port {port} on 127.0.0.1 is already in use by another program: set "
                                   f"S3_PORT to a free port for this command (make ... S3_PORT={port + 1}) or ports.s3 in "
                                   "params.yaml, or stop what listens there.")
    assert not (tmp_path / "stack").exists()  # nothing initialised, nothing started


def test_down_on_a_stack_that_never_ran_stops_nothing(tmp_path):
    """`down` with no state folder succeeds quietly: one line saying where the state would stay,
    nothing on stderr, and no folder, pid file or PostgreSQL cluster made on the way."""
    root = tmp_path / "stack"
    done = stack_cli("down", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"The stack is stopped; its state stays in {root.resolve()}.\n"
    assert done.stderr == ""
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_kill_stops_the_service_and_the_sessions_its_children_started(tmp_path):
    stack = Stack(tmp_path / "stack", tmp_path, Ports(1, 2, 3, 4))
    # A "worker" whose child leaves its process group (as a flow run does) and lives on.
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "start_new_session=True); time.sleep(120)")
    pid = stack.spawn("worker", [sys.executable, "-c", script], dict(os.environ))
    deadline = time.monotonic() + 30
    while not descendants(pid):
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.1)
    child = descendants(pid)[0]
    assert os.getpgid(child) != os.getpgid(pid)
    stack.kill("worker")
    assert not alive(pid) and not alive(child)
    assert not stack.running("worker") and not stack.pid_file("worker").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="as an ordinary user the cluster is that user's, in .stack/")
def test_as_root_the_data_goes_where_the_postgres_user_can_reach_it(tmp_path):
    # pytest's folders for root are closed to others (mode 700): the data goes to /var/tmp.
    user = owner()
    root = tmp_path / "stack"
    root.mkdir()
    folder = cluster_folder(root, user)
    try:
        assert (root / "postgres").is_symlink() and str(folder).startswith("/var/tmp/finetune-stack-")
        assert folder.owner() == "postgres"
        assert cluster_folder(root, user) == folder  # the same place next time
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_restore_refuses_what_is_not_a_stack_backup_in_one_paragraph(tmp_path):
    import io
    import tarfile

    not_gzip = tmp_path / "notes.tar.gz"
    not_gzip.write_text("hello")
    no_manifest = tmp_path / "other.tar.gz"
    with tarfile.open(no_manifest, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    for archive, says in ((tmp_path / "missing.tar.gz", "no such file"), (not_gzip, "is not a readable stack backup"),
                          (no_manifest, "has no manifest.json")):
        done = stack_cli("restore", "--root", str(tmp_path / "stack"), "--file", str(archive))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"make stack-restore: {archive}") and says in done.stderr, done.stderr
        assert "make stack-backup" in done.stderr  # the fix: an archive that it wrote
    assert not (tmp_path / "stack").exists()  # nothing started, nothing written


def test_restore_never_overwrites_a_stack_that_holds_data(tmp_path):
    from stack.backup import FORMAT
    from stack.postgres import DATABASES

    archive = tmp_path / "stack.tar.gz"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "manifest.json").write_text(f'{{"format": {FORMAT}, "created": "now", "objects": 0}}')
    dumps = [f"{name}.dump" for name in DATABASES]
    for name in dumps:
        (scratch / name).write_bytes(b"")
    subprocess.run(["tar", "czf", str(archive), "-C", str(scratch), "manifest.json", *dumps], check=True)
    kept = tmp_path / "stack" / "objects" / "finetune" / "model.pt._S3rver_object"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a model")
    done = stack_cli("restore", "--root", str(tmp_path / "stack"), "--file", str(archive))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "already holds a stack's data" in done.stderr and "make stack-down PURGE=1" in done.stderr
    assert kept.read_bytes() == b"a model"


def test_without_node_the_stack_names_what_to_install_before_anything_starts(tmp_path):
    bare = tmp_path / "bin"  # a PATH with this Python but no node or npm
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    done = subprocess.run([str(bare / "python"), "-m", "stack", "up", "--root", str(tmp_path / "stack"),
                           *[f"--port={name}={free}" for name, free in (("UI", 1), ("PREFECT", 2), ("S3", 3), ("POSTGRES", 4))]],
                          cwd=REPO, env=dict(os.environ, PATH=str(bare)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "needs node and npm, which is not on PATH" in done.stderr and "apt-get install nodejs npm" in done.stderr
    assert not (tmp_path / "stack" / "postgres").exists()
