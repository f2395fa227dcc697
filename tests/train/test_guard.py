"""One trainer per output folder, and none left behind by a killed `dvc repro`: real processes,
real kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient
from test_training import TINY, make_project, paths, tiny_train

from finetune.core.config import load_params
from finetune.demo.workspace import stage_env, sync_workspace
from finetune.core.errors import TrainingBusy
from finetune.stages.search import search_variant
from finetune.stages.train import train_variant
from finetune.core.guard import LOCK_FILE, hold_folder

HOLD = ("import sys, time; from pathlib import Path; from finetune.core.guard import hold_folder\n"
        "with hold_folder(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")


def gone(pid: int, within: float) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_second_trainer_of_a_folder_fails_at_once_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p")
    out = project / "models" / "finetune"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=stage_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(project)
        started = time.monotonic()
        with pytest.raises(TrainingBusy) as caught:
            train_variant(load_params(), "finetune", paths())
        assert time.monotonic() - started < 2
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and f"kill {holder.pid}" in message
        assert message.startswith("models/finetune is being trained by another process")
        assert not (out / "model.pt").exists() and not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")  # what a kill mid-write leaves
    with hold_folder(out):  # the kernel released the killed holder's lock; its file is taken over
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (out / LOCK_FILE).exists() and not (out / ".checkpoint.pt.abc123.tmp").exists()


WAIT = ("from finetune.core.guard import stop_with_starter; import time\n"
        "stop_with_starter(); print('armed', flush=True); time.sleep(120)\n")
STARTER = "import subprocess, sys; subprocess.Popen(sys.argv[1:]).wait()"


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_kill_9_of_the_starter_ends_the_child_behind_a_shell(tmp_path, shell):
    """bash -c execs the command (the parent-death signal fires); dash stays in between and
    survives its parent (the watch thread ends the child)."""
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    starter = subprocess.Popen([sys.executable, "-c", STARTER, shell, "-c", f"{sys.executable} {script}"],
                               cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, text=True)
    assert starter.stdout.readline().strip() == "armed"
    child = int(subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()[-1])
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    assert gone(child, within=3), f"pid {child} outlived its starter"


def dvc_workspace(root: Path, epochs: int) -> Path:
    """A DVC workspace of this project where train@finetune can run alone: its data, its file
    list and an empty models/source."""
    workspace = sync_workspace(REPO, root / "ws", TINY | tiny_train(epochs=epochs, max_steps=None), share_cache=False)
    data = make_project(root / "data")
    shutil.copytree(data / "data", workspace / "data", dirs_exist_ok=True)
    (workspace / "models" / "source").mkdir(parents=True)
    (workspace / "models" / "source" / "README.txt").write_text("no source model\n")
    # search.enabled is false here: the search stage records the recipe's lr (no training)
    search_variant(load_params(workspace / "params.yaml"), "finetune", Path("metrics/search/finetune.json"), workspace)
    return workspace


@pytest.mark.slow
def test_kill_9_of_dvc_repro_ends_the_training_and_a_rerun_resumes_the_same_run(tmp_path):
    # Enough tiny epochs that the trainer cannot finish them all in the half second the watch
    # thread may take to notice the kill (on a fast machine three epochs did).
    epochs = 12
    workspace = dvc_workspace(tmp_path, epochs=epochs)
    # SHELL=/bin/sh: dash stays between DVC and the stage, the case the parent-death signal misses.
    env = stage_env() | {"SHELL": "/bin/sh"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", "train@finetune"]
    out = workspace / "models" / "finetune"
    dvc = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists() and dvc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dvc.poll() is None, "finished before it could be killed: " + dvc.stdout.read()
    trainer = int((out / LOCK_FILE).read_text().split()[0])
    os.kill(dvc.pid, signal.SIGKILL)
    dvc.wait()
    assert gone(trainer, within=5), f"the trainer (pid {trainer}) outlived the killed dvc repro"
    time.sleep(1)
    assert not (out / "model.pt").exists()
    first = json.loads((out / "run.json").read_text())
    done = __import__("torch").load(out / "checkpoint.pt", weights_only=False)["epoch"]
    assert first["complete"] is False and 1 <= done < epochs

    second = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming: epoch {done} of {epochs} done" in second.stdout + second.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["mlflow_run_id"] == first["mlflow_run_id"] and record["complete"] is True
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == list(range(1, epochs + 1))
    children = [r for r in client.search_runs([run.info.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_id for r in children] == [run.info.run_id]
    # The lock file is gone before DVC hashes the output: the stage is clean afterwards.
    assert not (out / LOCK_FILE).exists()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "train@finetune"], cwd=workspace,
                            env=env, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr


ORPHAN = "import subprocess, sys; print(subprocess.Popen(sys.argv[1:]).pid, flush=True)"


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_whose_dvc_ended_before_it_started_ends_at_once(tmp_path, shell):
    """DVC killed before its stage's Python even ran: the stage finds only init above DVC's
    `sh -c` (DVC_STAGE says DVC started it), and exits in one line before importing torch."""
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    log = tmp_path / "stage.log"
    stage = f"sleep 1; exec {sys.executable} -m finetune.stages.train finetune --out m --metrics m.json --plots p.csv"
    env = stage_env() | {"DVC_STAGE": "train@finetune"}
    with log.open("w") as out:
        starter = subprocess.run([sys.executable, "-c", ORPHAN, shell, "-c", f"{stage} > {log} 2>&1"], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, text=True, check=True)
    wrapper = int(starter.stdout)  # its starter has ended already: the wrapper now belongs to init
    assert gone(wrapper, within=30), log.read_text()
    assert log.read_text().strip() == ("error: stage train@finetune not started: the process that started it (dvc "
                                       "repro) has already ended; nothing was done. Rerun `dvc repro` (or the flow).")


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_kill_9_of_dvc_repro_during_the_trainers_imports_leaves_no_trainer(tmp_path, shell):
    workspace = dvc_workspace(tmp_path, epochs=1)
    env = stage_env() | {"SHELL": shell}
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "train@finetune"], cwd=workspace,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = None
    deadline = time.monotonic() + 60
    while trainer is None and time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "finetune.stages.train finetune"], capture_output=True, text=True)
        trainer = next((int(pid) for pid in found.stdout.split()
                        if Path(f"/proc/{pid}/comm").exists() and "python" in Path(f"/proc/{pid}/comm").read_text()),
                       None)
        time.sleep(0.02)
    assert trainer is not None, "the trainer never started"
    os.kill(dvc.pid, signal.SIGKILL)  # while it imports torch and MLflow (seconds)
    dvc.wait()
    assert gone(trainer, within=5), f"the trainer (pid {trainer}) outlived the killed dvc repro"
    assert not (workspace / "models" / "finetune" / "model.pt").exists()
