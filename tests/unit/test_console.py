"""The progress bar's line (vptrain/console.py), on a scripted clock."""

from __future__ import annotations

import io

from vptrain.console import ProgressBar, parse_marker, progress_marker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bar_shows_steps_elapsed_and_time_left_and_lines_go_above_it(console):
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, clock=clock)
    bar.update(10, 40)  # a resumed run: timing starts at the first step seen
    clock.now += 60
    bar.update(20, 40)
    assert bar.text == "[" + "#" * 15 + "." * 15 + "] 20/40 steps  1:00 elapsed, 2:00 left"
    bar.line("step    20/40 | loss 1.0")
    assert out.getvalue().endswith("\r\x1b[2K\r" + bar.text)  # erased, the line printed, drawn again
    assert console.read() == "step    20/40 | loss 1.0\n"
    clock.now += 7200
    bar.update(40, 40)
    assert bar.text.endswith("] 40/40 steps  2:01:00 elapsed")
    bar.close()
    assert out.getvalue().endswith("\r\x1b[2K") and bar.text == ""


def test_markers_round_trip_and_other_lines_are_not_markers():
    assert parse_marker(progress_marker(3, 7)) == (3, 7)
    assert parse_marker("step     3/7 | loss 1.0") is None
    assert parse_marker("@vptrain-progress x y") is None
