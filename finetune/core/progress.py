"""Progress reporting: a tqdm bar on a terminal, plain log lines everywhere else.

Pipelines run under DVC, Prefect and CI, whose logs are files: a bar redrawn with carriage
returns turns into noise there, so off a TTY we log a line every ``every`` fraction instead;
with ``quiet_s``, only once that many seconds have passed since the start or the last line (an
epoch of a few seconds then logs nothing: its one summary line says enough).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Counts units of work towards an optional total and reports as it goes.

    Use as a context manager; ``update(n)`` after each chunk, ``reset(done)`` when work restarts
    (a download resumed at an offset, or started over).
    """

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        unit: str = "B",
        every: float = 0.1,
        stream: TextIO | None = None,
        quiet_s: float = 0.0,
    ) -> None:
        self.desc, self.total, self.unit, self.every, self.quiet_s = desc, total, unit, every, quiet_s
        self.done = 0.0
        self._reported = 0  # how many ``every`` steps have been logged
        self._last_line = time.monotonic()  # the start, then each logged line
        self._lines = 0
        stream = stream or sys.stderr
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=stream)
            if stream.isatty()
            else None
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    def reset(self, done: float = 0, total: float | None = None) -> None:
        """Start counting again from ``done`` (and a new total, if given)."""
        self.done = done
        self.total = total if total is not None else self.total
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(done)
        self._reported = self._steps()

    def update(self, n: float) -> None:
        """Add ``n`` units of work."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.total and self._steps() > self._reported:
            if time.monotonic() - self._last_line >= self.quiet_s:
                log.info("%s: %s", self.desc, self.describe())
                self._last_line, self._lines = time.monotonic(), self._lines + 1
            self._reported = self._steps()

    def describe(self) -> str:
        """``42% (1.2 MB of 2.9 MB)``, or just the count when the total is unknown."""
        done = human(self.done, self.unit)
        if not self.total:
            return done
        return f"{self._fraction():.0%} ({done} of {human(self.total, self.unit)})"

    def close(self, failed: bool = False) -> None:
        """Finish the bar, or log the final count (``failed``: where the work stopped, never "done")."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif failed:
            log.info("%s: failed after %s", self.desc, human(self.done, self.unit))
        elif self._lines or not self.quiet_s:  # quiet work that logged nothing ends quietly too
            log.info("%s: done, %s", self.desc, human(self.done, self.unit))

    def _fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def _steps(self) -> int:
        # The epsilon keeps 0.3 / 0.1 from landing at 2.999... steps.
        return int(self._fraction() / self.every + 1e-9)


def human(value: float, unit: str) -> str:
    """``value`` for people: bytes with k/M/G prefixes, other units as counted."""
    if unit != "B":
        return f"{value:g} {unit}"
    for prefix in ("", "k", "M", "G"):
        if value < 1000 or prefix == "G":
            return f"{value:.1f} {prefix}B" if prefix else f"{value:.0f} B"
        value /= 1000
    raise AssertionError("unreachable")
