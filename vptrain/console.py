"""What a person watching a run sees: its lines through `logging` and, on a terminal, a progress bar.

Lines go to the `vptrain` logger when logging is configured for it (under Hydra: the console and
the run's `cli.log`, with a timestamp there), else straight to stdout (a rank process, whose stdout
its launcher collects; a test). The logging rank of a local multi-rank run is not on the terminal:
its launcher is. When the launcher's stdout is a terminal it asks that rank (VPTRAIN_PROGRESS=1)
for one marker line per step, which it turns into the bar under the other lines instead of
printing or logging it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOGGER = "vptrain"
PROGRESS_ENV = "VPTRAIN_PROGRESS"
MARKER = "@vptrain-progress "
BAR_WIDTH = 30


def console_line(text: str) -> None:
    log = logging.getLogger(LOGGER)
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(text)
    else:
        print(text, flush=True)


def progress_marker(done: int, total: int) -> str:
    return f"{MARKER}{done} {total}"


def parse_marker(line: str) -> tuple[int, int] | None:
    """(steps done, steps in the run) of a marker line, None for any other line."""
    if not line.startswith(MARKER):
        return None
    try:
        done, total = (int(x) for x in line[len(MARKER):].split())
    except ValueError:
        return None
    return done, total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """One line kept at the bottom of a terminal: `[#####.....] 12/100 steps  0:41 elapsed, 5:01 left`.
    Every other line is written above it (`line`)."""

    def __init__(self, stream: TextIO | None = None, clock=time.monotonic):
        self.stream = stream or sys.stdout
        self.clock = clock
        self.started: float | None = None
        self.first_done = 0
        self.text = ""

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:  # time from the first step seen: a resumed run starts mid-way
            self.started, self.first_done = now, done
        filled = BAR_WIDTH * done // max(total, 1)
        elapsed = now - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        self.text = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} steps  "
                     f"{_duration(elapsed)} elapsed{left}")
        self._draw()

    def line(self, text: str) -> None:
        self._erase()
        console_line(text)
        self._draw()

    def close(self) -> None:
        self._erase()
        self.text = ""

    def _erase(self) -> None:
        if self.text:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _draw(self) -> None:
        if self.text:
            self.stream.write("\r" + self.text)
            self.stream.flush()
