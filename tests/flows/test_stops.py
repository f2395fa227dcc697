"""Nothing hangs, every end is announced, stops are clean: `python -m flows.pipeline` on Prefect's
ephemeral server, running a real DVC stage (a small script) that is stopped (SIGSTOP) or that
the flow is told to stop (SIGTERM, SIGINT), with notifications to a real JSON receiver on
127.0.0.1 (apprise's json://)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO

from finetune.demo.workspace import write_params
from flows.lock import workspace_lock

# The stage: says it started (its pid), then sleeps; with `finish`, a SIGTERM makes it write its
# output and exit 0, as a training that completes just as the flow is told to stop.
STAGE = """import os, signal, sys, time
def finish(*_):
    open("out.txt", "w").write("done\\n")
    raise SystemExit(0)
if sys.argv[1] == "finish":
    signal.signal(signal.SIGTERM, finish)
open("started", "w").write(str(os.getpid()))
time.sleep(300)
"""


@pytest.fixture
def receiver(json_receiver):
    """conftest's JSON receiver, as apprise's json:// URL."""
    address, received = json_receiver
    return f"json://{address}/hook", received


def workspace(root: Path, url: str, mode: str, limit_s: float) -> Path:
    """A DVC project with one stage (STAGE in ``mode``) under a ``limit_s`` timeout, notifying ``url``."""
    root.mkdir()
    write_params(REPO / "params.yaml", root / "params.yaml", {
        "model.weights": "none", "data.url": "mirror/hotdog.zip", "timeouts.stage_s.other": limit_s,
        "timeouts.grace_s": 5, "notify.urls": [url]})
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(f"stages:\n  slow:\n    cmd: python stage.py {mode}\n    deps: [stage.py]\n"
                                   "    outs: [out.txt]\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def start_flow(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, list[psutil.Process]]:
    """`python -m flows.pipeline` in ``root``, once its stage runs: the flow, the stage's pid and
    every process below the flow (Prefect's ephemeral server, DVC, the stage)."""
    # /bin/sh as DVC's shell (as where SHELL is unset, e.g. CI): dash stays between DVC and the
    # stage as `sh -c`, which a stop must not kill before the stage has finished.
    env = env | {"SHELL": "/bin/sh"}
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (root / "started").exists():
        assert flow.poll() is None and time.monotonic() < deadline, flow.communicate()[0]
        time.sleep(0.1)
    time.sleep(0.3)  # its pid written
    return flow, int((root / "started").read_text()), psutil.Process(flow.pid).children(recursive=True)


def assert_clean(root: Path, processes: list[psutil.Process]) -> None:
    """The workspace lock is free and nothing the flow started is left."""
    with workspace_lock(root, wait=False):
        pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.slow
def test_a_stopped_stage_fails_the_flow_at_its_timeout(tmp_path, prefect_env, receiver):
    url, received = receiver
    root = workspace(tmp_path / "ws", url, "sleep", limit_s=8)
    flow, stage, processes = start_flow(root, prefect_env)
    os.kill(stage, signal.SIGSTOP)
    stopped = time.monotonic()
    output = flow.communicate(timeout=180)[0]
    took = time.monotonic() - stopped
    print(f"flow failed {took:.1f} s after the SIGSTOP (stage limit 8 s, grace 5 s)")
    assert flow.returncode == 1, output
    assert "pipeline failed: stage 'slow' ran past its limit of 8 s (timeouts.stage_s.other)" in output
    assert took < 8 + 5 + 30, output  # the limit, the grace, Prefect's own ending
    assert_clean(root, processes)
    assert [r["title"] for r in received] == ["finetune finetune-pipeline: timeout"]
    assert "ran past its limit" in received[0]["message"] and received[0]["type"] == "failure"
    assert not (root / "dvc.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "mode"), [(signal.SIGTERM, "finish"), (signal.SIGINT, "sleep")],
                         ids=["SIGTERM-while-it-finishes", "SIGINT-while-it-runs"])
def test_a_signal_stops_the_flow_cleanly_and_keeps_a_finished_stage(tmp_path, prefect_env, receiver, sig, mode):
    """SIGTERM while the stage finishes: it is recorded in dvc.lock. SIGINT while it sleeps: it is
    stopped and not recorded. Either way: out within 30 s, lock free, nothing left, announced."""
    url, received = receiver
    root = workspace(tmp_path / "ws", url, mode, limit_s=600)
    flow, stage, processes = start_flow(root, prefect_env)
    flow.send_signal(sig)
    sent = time.monotonic()
    output = flow.communicate(timeout=60)[0]
    took = time.monotonic() - sent
    print(f"{sig.name}: the flow exited {took:.1f} s later")
    assert took < 30 and flow.returncode == 130, output
    assert "stopped: the running stage was stopped" in output and "Traceback" not in output
    assert_clean(root, processes)
    assert [r["title"] for r in received] == ["finetune finetune-pipeline: cancellation"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                            text=True)
    if mode == "finish":  # the stage completed: DVC recorded it, and a rerun has nothing to do
        lock = root / "dvc.lock"
        assert lock.exists() and "out.txt" in lock.read_text() and json.loads(status.stdout) == {}, output
    else:
        assert not (root / "dvc.lock").exists() and "slow" in json.loads(status.stdout)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server (flows/server.py starts it as `make scheduler` does)."""
    from conftest import free_port

    from flows.server import start_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    server = start_server(home, port)
    yield f"http://127.0.0.1:{port}/api", home
    server.terminate()
    server.wait(timeout=30)


def flow_run_of(stage: int, worker: int) -> psutil.Process:
    """The worker's child process (a flow run) above the stage's process."""
    return next(p for p in psutil.Process(stage).parents() if p.ppid() == worker)


def wait_for(what, timeout: float, why: str):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_a_killed_flow_run_is_announced_and_a_stopped_worker_stops_its_runs(tmp_path, prefect_api, receiver):
    """The scheduled deployment served by `python -m flows.retrain` (the worker): kill -9 of a flow
    run's process is announced as a crash (by the worker); SIGTERM to the worker ends it within
    30 s, after its running flow run stopped its stage and announced a cancellation."""
    from finetune.demo.workspace import stage_env

    url, received = receiver
    api, home = prefect_api
    root = workspace(tmp_path / "ws", url, "sleep", limit_s=600)
    env = stage_env() | {"PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--workspace", str(root)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    trigger = [sys.executable, "-m", "prefect", "deployment", "run", "finetune-retrain/scheduled-retrain"]
    try:
        wait_for(lambda: subprocess.run(trigger, env=env, capture_output=True).returncode == 0, 180,
                 "the deployment was never served")
        wait_for(lambda: (root / "started").exists(), 120, "the flow run never started its stage")
        time.sleep(0.3)
        run = flow_run_of(int((root / "started").read_text()), worker.pid)
        stage_tree = run.children(recursive=True)
        run.kill()
        wait_for(lambda: received, 60, "no notification of the killed flow run")
        assert [r["title"] for r in received] == ["finetune finetune-retrain: crash"]
        psutil.wait_procs(stage_tree, timeout=10)  # the stage (no guard of its own) is stopped by hand
        for process in stage_tree:
            if process.is_running():
                process.kill()

        (root / "started").unlink()
        assert subprocess.run(trigger, env=env, capture_output=True).returncode == 0
        wait_for(lambda: (root / "started").exists(), 120, "the second flow run never started its stage")
        time.sleep(0.3)
        processes = psutil.Process(worker.pid).children(recursive=True)
        worker.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        worker.wait(timeout=60)
        took = time.monotonic() - sent
        print(f"worker exited {took:.1f} s after SIGTERM")
        assert took < 30, (tmp_path / "worker.log").read_text()
        assert_clean(root, processes)
        assert [r["title"] for r in received][1:] == ["finetune finetune-retrain: cancellation"], \
            (received[1:], (tmp_path / "worker.log").read_text())
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)


HANGS = """
import subprocess, sys, time
from flows.proctree import stop_on_signals
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
stop_on_signals(exit_after_s=1.0, message="stopped by the deadline")
while True:  # an unwinding that never ends: every KeyboardInterrupt swallowed
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        pass
"""


def test_a_stop_that_cannot_unwind_still_ends_within_its_deadline(tmp_path):
    """The safety net under the KeyboardInterrupt: the process and everything below it end."""
    process = subprocess.Popen([sys.executable, "-c", HANGS], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    child = psutil.Process(int(process.stdout.readline()))
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and time.monotonic() - sent < 10, err
    assert err.strip() == "stopped by the deadline"
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
