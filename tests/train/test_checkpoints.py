"""Checkpoints that cannot be read or written: a message and a way on, never a raw traceback."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_training import OnEpoch, fit_tiny, make_project

from finetune.core.errors import WriteError
from finetune.core.files import write_atomic
from finetune.train.checkpoints import CHECKPOINT, CheckpointWriter, load_checkpoint, save_checkpoint


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(tmp_path)


@pytest.mark.slow
def test_a_truncated_checkpoint_is_set_aside_and_training_starts_again(project, caplog):
    model, run = fit_tiny(project, epochs=1)
    run()
    folder = project / "models" / "t"
    path = folder / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut off, as by a full disk or a copy that stopped

    with caplog.at_level(logging.WARNING, logger="finetune.train.checkpoints"):
        assert load_checkpoint(folder, "t") is None
    assert not list(folder.glob(f"{CHECKPOINT}.corrupt-*"))  # not inside the DVC output models/t
    (aside,) = (project / "models" / "set-aside" / "t").glob(f"{CHECKPOINT}.corrupt-*")
    assert not path.exists() and aside.read_bytes() == data[: len(data) // 2]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and str(aside) in record.getMessage()

    model2, run2 = fit_tiny(project, epochs=2)
    epochs = []
    run2(checkpoint=load_checkpoint(folder, "t"), callbacks=[OnEpoch(lambda s: epochs.append(s.epoch))])
    assert epochs == [1, 2] and load_checkpoint(folder, "t")["epoch"] == 2


def test_a_file_that_is_no_checkpoint_is_set_aside_too(tmp_path):
    folder = tmp_path / "models" / "v"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT).write_bytes(b"")  # an empty file: torch's EOFError
    assert load_checkpoint(folder, "t") is None
    assert list(folder.iterdir()) == []
    aside = tmp_path / "models" / "set-aside" / "v"
    assert [p.name.split("-")[0] for p in aside.iterdir()] == [f"{CHECKPOINT}.corrupt"]


@contextmanager
def as_another_user():
    """Run the block as an unprivileged user: root writes through any chmod."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)  # nobody
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_an_unwritable_folder_is_a_message_naming_the_path_and_the_fix():
    root = Path(tempfile.mkdtemp(prefix="unwritable-"))  # under /tmp: every user may pass through
    folder = root / "models"
    folder.mkdir()
    (folder / CHECKPOINT).write_bytes(b"old")
    root.chmod(0o755)
    folder.chmod(0o555)
    try:
        with as_another_user(), pytest.raises(WriteError) as caught:
            save_checkpoint(folder, {"epoch": 1})
        assert (folder / CHECKPOINT).read_bytes() == b"old" and [p.name for p in folder.iterdir()] == [CHECKPOINT]
    finally:
        folder.chmod(0o755)
        shutil.rmtree(root)
    message = str(caught.value)
    assert message.startswith(f"cannot write {folder / CHECKPOINT}: Permission denied; ")
    assert f"write access to {folder}" in message


def test_a_file_in_the_way_of_the_folder_is_a_message(tmp_path):
    (tmp_path / "models").write_text("not a folder")
    target = tmp_path / "models" / "finetune" / "model.pt"
    with pytest.raises(WriteError) as caught:
        write_atomic(target, lambda tmp: tmp.write_text("x"))
    assert str(caught.value).startswith(f"cannot write {target}: ")
    assert f"; {tmp_path / 'models'} is a file where a folder is expected: move it away" in str(caught.value)


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 256 KiB tmpfs: a real full disk (needs root's mount; skipped elsewhere)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # torch may still hold its file open


@pytest.mark.parametrize("torch_save_to_path", [False, True])
def test_a_full_disk_is_a_message_and_keeps_the_old_checkpoint(full_disk, torch_save_to_path):
    import torch

    (full_disk / CHECKPOINT).write_bytes(b"old")
    state = {"weights": torch.zeros(200_000)}  # 800 KB: more than the disk holds
    with pytest.raises(WriteError) as caught:
        if torch_save_to_path:  # torch's own "unexpected pos" error: the free space tells
            write_atomic(full_disk / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        else:
            save_checkpoint(full_disk, state)
    assert str(caught.value).startswith(f"cannot write {full_disk / CHECKPOINT}: {os.strerror(errno.ENOSPC)}; ")
    assert "df -h" in str(caught.value)
    assert (full_disk / CHECKPOINT).read_bytes() == b"old" and [p.name for p in full_disk.iterdir()] == [CHECKPOINT]


def test_the_background_writer_saves_each_epoch_as_it_was(tmp_path):
    """The next epoch changes the weights in place while the last one's file is written: the
    file holds the values at save time, and the best weights (never changed in place) as given."""
    import torch

    live = torch.zeros(500_000)
    writer = CheckpointWriter(tmp_path)
    for epoch in (1, 2):
        writer.save({"epoch": epoch, "model": {"w": live}, "optimizer": {"state": [live * 2]}, "best": live[:3]})
        live += 1  # the next epoch's steps
    writer.wait()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert saved["epoch"] == 2 and torch.all(saved["model"]["w"] == 1)
    assert torch.all(saved["optimizer"]["state"][0] == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_a_failed_background_write_is_raised_by_the_training_and_keeps_the_old_checkpoint(full_disk):
    import torch

    (full_disk / CHECKPOINT).write_bytes(b"old")
    writer = CheckpointWriter(full_disk)
    writer.save({"epoch": 1, "model": {"w": torch.zeros(200_000)}})  # more than the disk holds
    with pytest.raises(WriteError, match="df -h"):
        writer.wait()
    writer.wait()  # raised once: the training's error handling is not raised at again
    assert (full_disk / CHECKPOINT).read_bytes() == b"old"


def test_other_errors_of_the_writer_pass_unchanged(tmp_path):
    def fail(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "some input"))

    with pytest.raises(PermissionError):  # about another file: not write_atomic's to explain
        write_atomic(tmp_path / "out.txt", fail)


@pytest.mark.parametrize(("every_s", "elapsed", "final", "due"), [
    (0, 0.0, False, True),  # 0: every epoch
    (30, 29.9, False, False),
    (30, 30.0, False, True),
    (30, 1.0, True, True),  # the last epoch always: the outputs are made from it
])
def test_an_epoch_is_checkpointed_when_its_interval_has_passed_or_it_is_the_last(every_s, elapsed, final, due):
    now = [100.0]
    writer = CheckpointWriter(Path("unused"), every_s, clock=lambda: now[0])
    now[0] += elapsed
    assert writer.due(final) is due


def test_a_saved_checkpoint_starts_the_next_interval(tmp_path):
    now = [0.0]
    writer = CheckpointWriter(tmp_path, 30, clock=lambda: now[0])
    now[0] = 31.0
    writer.save({"epoch": 1})
    writer.wait()
    now[0] = 60.0
    assert not writer.due(final=False)  # 29 s after the save, though 60 s after the start
    now[0] = 61.0
    assert writer.due(final=False)


@pytest.mark.slow
@pytest.mark.parametrize(("every_s", "changes", "written"), [
    (0, {}, [1, 2, 3]),
    (3600, {}, [3]),  # tiny epochs, a long interval: the last epoch only
    (3600, {"early_stopping": {"patience": 1, "min_delta": 1.0}}, [2]),  # where early stopping ends it
])
def test_fit_checkpoints_by_its_interval_and_always_the_epoch_it_ends_with(project, monkeypatch, every_s, changes,
                                                                           written):
    from finetune.train import checkpoints

    epochs, save = [], checkpoints.save_checkpoint

    def recording(out_dir, state):
        epochs.append(state["epoch"])
        save(out_dir, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", recording)
    _, run = fit_tiny(project, epochs=3, checkpoint_every_s=every_s, **changes)
    run()
    assert epochs == written
    assert load_checkpoint(project / "models" / "t", "t")["epoch"] == written[-1]
