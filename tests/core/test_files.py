"""write_atomic: the whole new file or the old one, never half, never a leftover."""

from __future__ import annotations

import pytest

from finetune.core.files import write_atomic


def test_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
