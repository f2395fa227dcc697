"""`make run` on a machine that cannot reach data.url: one attempt, no retries at either level
(the download's or Prefect's), and one final message that says what failed, the air-gapped
route and `make demo`, with no traceback unless --verbose. Real Prefect (local ephemeral
server), real DVC, a real name that does not resolve and a real refused port."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from finetune.demo.workspace import sync_workspace
from tasks.dvc import StageFailed, network_failure


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_offline(workspace: Path, env: dict[str, str], *options: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--workspace", str(workspace), *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("host", "dataset_here", "why", "final_start"), [
    # A fresh clone offline: the host name is checked before Prefect starts; no stage runs.
    ("nonexistent.invalid", False, "the host name nonexistent.invalid does not resolve",
     "pipeline failed before its first stage: Could not download"),
    # A dataset here but a new data.url: the fetch stage finds out, once, and Prefect does not rerun it.
    ("nonexistent.invalid", True, "the host name nonexistent.invalid does not resolve",
     "pipeline failed: stage 'fetch' failed: Could not download"),
    # A closed port: nothing listens there now, which waiting a minute rarely changes.
    ("127.0.0.1:{port}", False, "127.0.0.1 refused the connection",
     "pipeline failed: stage 'fetch' failed: Could not download"),
])
def test_an_unreachable_data_url_ends_with_one_message_and_no_retries(tmp_path, prefect_env, host, dataset_here,
                                                                      why, final_start):
    url = f"http://{host.format(port=closed_port())}/hotdog.zip"
    # data.retries stays as params.yaml has it: the point is that none of them is used.
    workspace = sync_workspace(REPO, tmp_path / "ws", {"data.url": url}, share_cache=False)
    if dataset_here:
        (workspace / "data" / "hotdog" / "train").mkdir(parents=True)
    code, output = run_offline(workspace, prefect_env)
    assert code == 1
    final = output.rstrip().splitlines()[-1]
    assert final.startswith(final_start), output
    for phrase in (why, "Not retried", "air-gapped", "file:///", "data.checksum", "`make demo`"):
        assert phrase in final, (phrase, final)
    assert output.count("air-gapped") == 1 and output.count("Could not download") == 1, output
    assert "Traceback" not in output and "Finished in state Failed" not in output, output
    # At most one attempt: no backoff in the download, no rerun of the task by Prefect.
    assert "retry" not in output.lower() and "AwaitingRetry" not in output, output
    ran = final_start.startswith("pipeline failed: stage")
    assert output.count("Running stage 'fetch'") == int(ran)
    assert "done, 0 B" not in output and ("download hotdog.zip: failed after 0 B" in output) == ran
    assert "To track the changes with git" not in output


@pytest.mark.slow
def test_verbose_shows_prefects_reports_and_the_traceback(tmp_path, prefect_env):
    workspace = sync_workspace(REPO, tmp_path / "ws", {"data.url": "http://nonexistent.invalid/hotdog.zip"},
                               share_cache=False)
    (workspace / "data" / "hotdog").mkdir(parents=True)  # so that the fetch stage runs and fails
    code, output = run_offline(workspace, prefect_env, "--verbose")
    assert code == 1
    assert "Traceback" in output and "Finished in state Failed" in output
    assert "\npipeline failed: stage 'fetch' failed: Could not download" in output


@pytest.mark.parametrize(("line", "retried"), [
    ("error: Could not download http://nonexistent.invalid/hotdog.zip: the host name nonexistent.invalid "
     "does not resolve (DNS: Name or service not known). Not retried: ...", False),
    ("error: Could not download http://127.0.0.1:9/hotdog.zip: 127.0.0.1 refused the connection "
     "(nothing listens on that port). Not retried: ...", False),
    ("error: Could not download https://x/hotdog.zip: no connection to x after 5 attempts (timed out)", True),
    ("error: Download of https://x failed after 5 attempts; the last one: HTTP 503. The server or the "
     "connection is failing", True),
    ("error: Checksum mismatch for https://x/hotdog.zip", False),
])
def test_prefect_reruns_the_fetch_only_for_a_network_that_failed_on_the_way(line, retried):
    from prefect.states import Failed

    state = Failed(data=StageFailed("stage 'fetch' failed", ["Running stage 'fetch':", line], "fetch"))
    assert network_failure(None, None, state) is retried


def test_the_final_message_carries_a_stages_whole_error_or_points_at_the_log():
    from flows.pipeline import failure_message

    lines = ["Running stage 'validate':", "error: validation failed: 1 expectation(s) not met:",
             "- min_images: at least 3 images", "    class hotdog", "Nothing downstream runs.",
             "ERROR: failed to reproduce 'validate': failed to run: python -m finetune.stages.validate"]
    err = StageFailed("stage 'validate' failed in /ws (dvc repro exited 255); DVC's output is in the lines above",
                      lines, "validate")
    assert failure_message(err, verbose=False) == (
        "pipeline failed: stage 'validate' failed: validation failed: 1 expectation(s) not met:\n"
        "- min_images: at least 3 images\n    class hotdog\nNothing downstream runs.")
    crashed = StageFailed("stage 'train@x' failed in /ws (dvc repro exited 1); DVC's output is in the lines above",
                          ["Traceback (most recent call last):", "ZeroDivisionError"], "train@x")
    assert failure_message(crashed, verbose=False) == f"pipeline failed: {crashed}"
    expected = "pipeline failed: TimeoutError: lock (--verbose shows where)"
    assert failure_message(TimeoutError("lock"), verbose=False) == expected


def test_dvcs_git_reminder_and_push_notice_are_left_out_of_the_task_log_and_nothing_else():
    from tasks.dvc import without_git_notices

    # What dvc repro prints after a stage (dvc/repo/scm_context.py), between the stage's own lines.
    reminder = ("\nTo track the changes with git, run:\n\n\tgit add data/.gitignore dvc.lock\n"
                "\nTo enable auto staging, run:\n\n\tdvc config core.autostage true")
    output = (f"Running stage 'fetch':\n> python -m finetune.stages.fetch\n\nUpdating lock file 'dvc.lock'\n"
              f"{reminder}\nUse `dvc push` to send your updates to remote storage.\n\n"
              "  git add is fine in a stage's own output")
    kept = list(without_git_notices(output.splitlines()))
    assert kept == ["Running stage 'fetch':", "> python -m finetune.stages.fetch", "", "Updating lock file 'dvc.lock'",
                    "", "  git add is fine in a stage's own output"]
