"""The orchestration's own parts: the report's Markdown, webhook notifications (a real local HTTP
server), the workspace lock across processes, and the retrain flow skipping a busy workspace
(under prefect_test_harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO

from finetune.core.config import NotifyConfig, load_params
from finetune.demo.workspace import write_params
from flows.lock import WorkspaceBusy, workspace_lock
from flows.notify import notify
from tasks.dvc import StageRun
from tasks.report import pipeline_markdown


@pytest.fixture
def webhook(json_receiver):
    """conftest's JSON receiver, as an http:// address."""
    address, received = json_receiver
    return f"http://{address}", received


@pytest.mark.parametrize(("event", "events", "delivered"), [("promotion", ("promotion",), True),
                                                             ("crash", ("crash", "promotion"), True),
                                                             ("refusal", ("failure", "promotion"), False)])
def test_notify_posts_the_events_asked_for(webhook, event, events, delivered):
    url, received = webhook
    cfg = NotifyConfig(urls=(url.replace("http://", "json://") + "/hook",), events=events, timeout_s=5)
    payload = {"message": "m", "workspace": "/w", "decision": {"action": "promoted"}}
    assert notify(cfg, event, payload) is delivered
    if delivered:
        assert [(r["path"], r["title"], r["type"]) for r in received] == [
            ("/hook", f"finetune pipeline: {event}", "failure" if event == "crash" else "success")]
        assert received[0]["message"] == "m\nworkspace: /w\ndecision.action: promoted"
    else:
        assert received == []


def test_a_failing_or_invalid_url_is_logged_not_raised(webhook, caplog):
    url, received = webhook
    broken = NotifyConfig(urls=(url.replace("http://", "json://") + "/broken",), events=("failure",), timeout_s=5)
    assert notify(broken, "failure", {}) is False
    assert len(received) == 1 and "did not reach every URL of notify.urls" in caplog.text
    assert notify(NotifyConfig(urls=(), events=("failure",), timeout_s=5), "failure", {}) is False
    assert notify(NotifyConfig(urls=("nosuchscheme://secret-token",), events=("failure",), timeout_s=5), "failure", {}) is False
    assert "'nosuchscheme://secr...' is not an apprise URL" in caplog.text


def test_the_old_webhook_url_key_says_what_replaced_it(tmp_path):
    from finetune.core.errors import ConfigError

    text = (REPO / "params.yaml").read_text().replace("  urls: []", "  webhook_url: https://hooks.example.org/x", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")
    assert "notify.webhook_url was replaced by notify.urls (apprise URLs): write urls: " \
           "[jsons://hooks.example.org/x]" in str(caught.value)
    assert "Traceback" not in str(caught.value) and "got {" not in str(caught.value)


HOLD = "import sys, time; from flows.lock import workspace_lock; ctx = workspace_lock(sys.argv[1], wait=False); " \
       "ctx.__enter__(); print('held', flush=True); time.sleep(60)"


@pytest.fixture
def busy(tmp_path):
    """``tmp_path`` locked by another process."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield tmp_path
    holder.kill()
    holder.wait()


def test_the_workspace_lock_excludes_a_second_process(busy):
    with pytest.raises(WorkspaceBusy, match="busy"):
        with workspace_lock(busy, wait=False):
            pass


def test_the_lock_is_free_again_after_use(tmp_path):
    with workspace_lock(tmp_path, wait=False):
        pass
    with workspace_lock(tmp_path, wait=False):
        pid, since = (tmp_path / ".finetune.lock").read_text().split()
        assert int(pid) == os.getpid() and time.strptime(since, "%Y-%m-%dT%H:%M:%S%z")


def test_a_waiting_run_says_whom_it_waits_for_and_gives_up_at_its_timeout(busy):
    said = []
    started = time.monotonic()
    with pytest.raises(WorkspaceBusy, match=r"after waiting \d+ s \(retrain.wait_timeout_s: 1.5\)") as caught:
        with workspace_lock(busy, wait=True, timeout_s=1.5, say=said.append):
            pass
    assert 1.5 <= time.monotonic() - started < 10
    holder_pid = (busy / ".finetune.lock").read_text().split()[0]
    assert len(said) == 1 and f"pid {holder_pid} since " in said[0] and "at most 2 s" in said[0]
    assert f"pid {holder_pid} since " in str(caught.value)


def test_a_waiting_run_goes_on_once_the_holder_is_gone(busy):
    holder_pid = int((busy / ".finetune.lock").read_text().split()[0])
    threading.Timer(1.0, os.kill, (holder_pid, 9)).start()
    said = []
    with workspace_lock(busy, wait=True, timeout_s=60, say=said.append):
        assert (busy / ".finetune.lock").read_text().split()[0] == str(os.getpid())
    assert len(said) == 1


VALUES = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9, "log_loss": 0.3}
# The evaluate stage's metrics of a run where finetune wins 0.9 to 0.8 on 100 test images.
EVALUATED = {"finetune": VALUES, "scratch": {k: v - 0.1 for k, v in VALUES.items()},
             "comparison": {"challenger": "finetune", "baseline": "scratch", "test_images": 100,
                            "delta": {k: 0.1 for k in VALUES},
                            "mcnemar": {"challenger_only": 9, "baseline_only": 1, "discordant": 10, "p_value": 0.0215}}}


def test_report_markdown_from_the_stage_files(tmp_path):
    write_params(REPO / "params.yaml", tmp_path / "params.yaml", {"study.enabled": True})
    params = load_params(tmp_path / "params.yaml")
    metrics = tmp_path / params.evaluate.metrics
    metrics.parent.mkdir(parents=True)
    (tmp_path / params.study.plots).mkdir(parents=True)
    (tmp_path / params.study.plots / "summary.json").write_text(json.dumps({"verdict": "fine-tuning wins."}))
    metrics.write_text(json.dumps(EVALUATED))
    decision = {"action": "refused", "production_before": "3", "production_after": "3", "reason": "gain -0.01"}
    text = pipeline_markdown(params, tmp_path, decision, [StageRun("fetch", 0.5, True), StageRun("train@finetune", 61.0, False)])
    assert text.splitlines()[2].startswith("**Verdict**: finetune beats scratch on test accuracy: 0.900 vs 0.800")
    assert "**Study** (reports/study.md): fine-tuning wins." in text
    assert "| accuracy | 0.9000 | 0.8000 | +0.1000 |" in text
    assert "of 100 test images the models disagree on 10" in text  # the evaluate report's own sentence
    assert "p = 0.0215" in text and "**Promotion**: refused — production v3 → v3: gain -0.01" in text
    assert "| fetch | skipped | 0.5 |" in text and "| train@finetune | ran | 61.0 |" in text


def test_a_run_that_registered_nothing_runs_no_gate_and_its_report_says_why(tmp_path):
    from tasks.registry import nothing_registered

    write_params(REPO / "params.yaml", tmp_path / "params.yaml", {})
    params = load_params(tmp_path / "params.yaml")
    assert nothing_registered(tmp_path) is None  # no record: the gate runs and says what is missing
    floor = {"accuracy_ci95_low": 0.4, "accuracy_ci95_high": 0.6, "chance_accuracy": 0.5}
    metrics = tmp_path / params.evaluate.metrics
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({
        "finetune": {"accuracy": 0.9, "chance_p_value": 1e-9, "above_chance": True} | floor,
        "scratch": {"accuracy": 0.5, "chance_p_value": 0.54, "above_chance": False} | floor,
        "comparison": {"challenger": "finetune", "baseline": "scratch", "test_images": 100, "chance_p": 0.01,
                       "delta": {"accuracy": 0.4}, "mcnemar": {"challenger_only": 40, "baseline_only": 0,
                                                               "discordant": 40, "p_value": 1e-12}}}))
    why = "finetune did no better than chance (accuracy 0.500, chance 0.500, binomial p = 0.54) on the test split"
    record = tmp_path / params.register_.record
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"model_name": "m", "version": None, "registered": False, "reason": why}))
    assert nothing_registered(tmp_path) == why
    text = pipeline_markdown(params, tmp_path, None, [])
    assert text.splitlines()[2].startswith("**Verdict**: scratch did no better than chance (accuracy 0.500, chance "
                                           "0.500, binomial p = 0.54) on 100 test images, so the comparison names no "
                                           "winner")
    assert f"**Registered**: nothing: {why}." in text and "**Promotion**" not in text


@pytest.mark.slow
def test_retrain_skips_a_busy_workspace(busy):
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain

    (busy / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with prefect_test_harness(server_startup_timeout=180):
        result = retrain(str(busy))
    assert "busy" in result["skipped"]
    assert not (busy / "data").exists()  # nothing ran


@pytest.mark.parametrize(("lines", "retried"), [
    (["error: Could not download https://x/hotdog.zip: no connection to x after 5 attempts"], True),
    (["Download of https://x failed after 5 attempts; the last one: 503. The server or the connection is failing"], True),
    (["error: Checksum mismatch for mirror/hotdog.zip"], False),
])
def test_fetch_is_retried_only_fornetwork_failures(lines, retried):
    from prefect.states import Failed

    from tasks.dvc import StageFailed, network_failure

    assert network_failure(None, None, Failed(data=StageFailed("stage 'fetch' failed", lines))) is retried
    assert network_failure(None, None, Failed(data=ValueError("other"))) is False


def test_a_finished_run_ends_with_its_answer_in_at_most_six_lines(tmp_path):
    """The verdict, the registered version, the gate's decision, where to look, and the push
    notice DVC would print after every stage, said once (only with a remote)."""
    from flows.pipeline import has_remote
    from tasks.report import closing_lines

    params = load_params(REPO / "params.yaml")
    (tmp_path / params.evaluate.metrics).parent.mkdir(parents=True)
    (tmp_path / params.evaluate.metrics).write_text(json.dumps(EVALUATED))
    (tmp_path / params.register_.record).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / params.register_.record).write_text(json.dumps(
        {"registered": True, "model_name": "hotdog-classifier", "version": "3", "variant": "finetune",
         "metric": "val_acc", "value": 0.9, "run_id": "abc"}))
    decision = {"action": "promoted", "production_before": "2", "production_after": "3", "reason": "better"}
    assert not has_remote(tmp_path)
    base = f"http://127.0.0.1:{params.ports.ui}/#/"
    links = {"runs": base + "experiments/1/runs?viewStateShareKey=pipeline-abc",
             "compare": base + "compare-runs?runs=%5B%22a%22%2C%20%22b%22%5D&experiments=%5B%221%22%5D",
             "parent": base + "experiments/1/runs/abc", "model": base + "models/hotdog-classifier/versions/3"}
    lines = closing_lines(params, tmp_path, decision, has_remote(tmp_path), links)
    assert len(lines) == 5 and lines[0].startswith("Verdict: finetune beats scratch")
    assert lines[1].startswith("Registered: hotdog-classifier version 3 (finetune")
    assert lines[2] == "Promotion: promoted — production v2 → v3: better"
    assert lines[3] == (f"Look: {tmp_path / params.evaluate.report} · MLflow (after `make ui WORKSPACE={tmp_path}`): "
                        f"{links['runs']}")
    assert lines[4] == f"Compare: {links['compare']}"
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text('[core]\n    remote = shared\n[\'remote "shared"\']\n    url = s3://b\n')
    with_remote = closing_lines(params, tmp_path, decision, has_remote(tmp_path), links | {"prefect": "http://p/runs/1"})
    assert len(with_remote) == 6 and "dvc push" in with_remote[-1]
    assert with_remote[4] == f"Compare: {links['compare']} · Prefect flow run: http://p/runs/1"
    assert all("**" not in line and len(line) <= 400 for line in with_remote)
    # No tracking record (the store did not answer): the report still, and no URL made up.
    assert closing_lines(params, tmp_path, decision, False)[3].endswith("MLflow (after `make ui WORKSPACE="
                                                                        f"{tmp_path}`): no run recorded")


def test_each_end_of_a_run_is_announced_as_its_own_event():
    from prefect.states import Cancelled, Cancelling, Crashed, Failed

    from flows.pipeline import ending

    assert ending(Failed(message="Flow run encountered an exception: StageFailed: stage 'fetch' failed")) == "failure"
    assert ending(Failed(message="Flow run encountered an exception: StageTimeout: stage 'fetch' ran past")) == "timeout"
    assert ending(Failed(message="Flow run exceeded timeout of 5 second(s)", name="TimedOut")) == "timeout"
    assert ending(Crashed(message="Flow run process exited with non-zero status code -9.")) == "crash"
    assert ending(Crashed(message="Execution was aborted by a termination signal.")) == "cancellation"
    assert ending(Cancelling(message="Runner is shutting down.")) == "cancellation"  # a worker that stops
    assert ending(Crashed(message="Execution was aborted by an interrupt signal.")) == "cancellation"
    assert ending(Cancelled(message="cancelled in the UI")) == "cancellation"
