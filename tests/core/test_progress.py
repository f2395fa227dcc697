"""Progress: plain log lines off a terminal, a tqdm bar on one."""

from __future__ import annotations

import io
import logging

import pytest

from finetune.core.progress import Progress, human


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_it_logs_every_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="finetune.core.progress"):
        with Progress("job", total=1000, stream=io.StringIO()) as progress:
            for _ in range(100):
                progress.update(10)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split()[1] for line in lines[:-1]] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1] == "job: done, 1.0 kB"


def test_quiet_work_logs_only_after_quiet_s(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("finetune.core.progress.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="finetune.core.progress"):
        with Progress("short", total=100, unit="img", stream=io.StringIO(), quiet_s=15) as progress:
            for _ in range(10):
                clock[0] += 1  # 10 s in all: nothing to say
                progress.update(10)
        with Progress("long", total=100, unit="img", stream=io.StringIO(), quiet_s=15) as progress:
            for _ in range(10):
                clock[0] += 4  # a line once 15 s have passed since the last
                progress.update(10)
    assert [record.getMessage() for record in caplog.records] == [
        "long: 40% (40 img of 100 img)", "long: 80% (80 img of 100 img)", "long: done, 100 img"]


def test_a_reset_continues_from_the_resumed_offset(caplog):
    with caplog.at_level(logging.INFO, logger="finetune.core.progress"):
        progress = Progress("dl", total=100, stream=io.StringIO())
        progress.update(35)
        progress.reset(done=50, total=100)
        progress.update(10)
    assert [record.getMessage() for record in caplog.records] == ["dl: 35% (35 B of 100 B)", "dl: 60% (60 B of 100 B)"]


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(caplog):
    terminal = FakeTerminal()
    with caplog.at_level(logging.INFO, logger="finetune.core.progress"):
        with Progress("bar", total=10, unit="img", stream=terminal) as progress:
            progress.update(10)
    assert "bar" in terminal.getvalue() and "10/10" in terminal.getvalue()
    assert caplog.records == []


@pytest.mark.parametrize(("value", "unit", "text"), [(999, "B", "999 B"), (1500, "B", "1.5 kB"),
                                                      (2.5e9, "B", "2.5 GB"), (12, "img", "12 img")])
def test_human_units(value, unit, text):
    assert human(value, unit) == text
