"""Workers die with their launcher, and a stuck rank is told from its waiting peers
(vptrain/launch/liveness.py). Real processes (plain Python, no torch), real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from vptrain.launch.liveness import (
    LAUNCHER_FD_ENV,
    LAUNCHER_PID_ENV,
    Heartbeat,
    heartbeat_age,
    heartbeat_path,
    process_state,
    stale_after,
    unresponsive,
)

GONE_WITHIN_S = 30.0  # a liveness deadline for a loaded machine, not a timing assertion

# A worker: arms its lifeline, says so with its pid, then would sleep for ten minutes.
WORKER = """
import os, sys, time
from vptrain.launch.liveness import hold_lifeline
assert hold_lifeline(sys.argv[1], 0)
with open(os.path.join(sys.argv[1], "ready"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""
# A launcher: starts the worker with the lifeline of `mode`, then sleeps until it is killed.
#   pipe:      its own pipe's read end, no parent-death signal (what a non-main-thread launcher gets);
#   pdeathsig: the parent-death signal, with a pipe whose write end the *test* holds (never EOF).
LAUNCHER = """
import os, subprocess, sys, time
mode, run_dir, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = dict(os.environ)
if mode == "pipe":
    fd, keep = os.pipe()
else:
    env[LAUNCHER_PID_ENV] = str(os.getpid())
env[LAUNCHER_FD_ENV] = str(fd)
subprocess.Popen([sys.executable, "-c", WORKER, run_dir], env=env, pass_fds=(fd,), start_new_session=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z", "X")  # a zombie has exited; reaping is its new parent's job


def _wait_for(predicate, what: str, timeout: float = GONE_WITHIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["pipe", "pdeathsig"])
def test_a_worker_dies_when_its_launcher_is_killed(tmp_path, mode):
    (tmp_path / "logs").mkdir()
    r, w = os.pipe()
    script = f"LAUNCHER_FD_ENV={LAUNCHER_FD_ENV!r}\nLAUNCHER_PID_ENV={LAUNCHER_PID_ENV!r}\nWORKER={WORKER!r}\n"
    launcher = subprocess.Popen([sys.executable, "-c", script + LAUNCHER, mode, str(tmp_path), str(r)],
                                cwd=REPO, pass_fds=(r,))
    os.close(r)
    try:
        ready = tmp_path / "ready"
        _wait_for(lambda: ready.exists() and ready.read_text(), "the worker never armed its lifeline", 120)
        worker = int(ready.read_text())
        time.sleep(0.5)
        assert not _gone(worker), "the worker must live while its launcher does"
        launcher.kill()
        launcher.wait()
        _wait_for(lambda: _gone(worker), f"worker {worker} outlived its launcher ({mode})")
        if mode == "pipe":
            log = (tmp_path / "logs" / "rank_0.log").read_text()
            assert f"the launcher (pid {launcher.pid}) is gone" in log
    finally:
        os.close(w)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if (tmp_path / "ready").exists() and not _gone(int((tmp_path / "ready").read_text())):
            os.kill(int((tmp_path / "ready").read_text()), signal.SIGKILL)


def test_a_stopped_process_is_named_first_and_a_live_one_is_not(tmp_path):
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        _wait_for(lambda: process_state(stopped.pid) == "T", "SIGSTOP did not stop the process")
        found = unresponsive(str(tmp_path), {1: stopped.pid, 2: running.pid}, collective_timeout_s=20)
        assert [rank for rank, _ in found] == [1]
        assert "stopped (state T)" in found[0][1]
    finally:
        for p in (stopped, running):
            p.kill()
            p.wait()


def test_stale_heartbeats_are_named_longest_silence_first(tmp_path):
    (tmp_path / "logs").mkdir()
    now = time.time()
    timeout = 20.0
    limit = stale_after(timeout)
    assert 0 < limit < timeout, "stale before a peer can time out, and not at every pause"
    for rank, age in {0: 0.5, 1: limit + 30, 2: limit + 5}.items():
        (tmp_path / "logs" / f"rank_{rank}.alive").write_text(f"{now - age:.3f}\n")
    # Rank 4 was stopped between creating its file and writing the time: the file's age counts.
    (tmp_path / "logs" / "rank_4.alive").write_text("")
    os.utime(tmp_path / "logs" / "rank_4.alive", (now - limit - 10, now - limit - 10))
    found = unresponsive(str(tmp_path), {0: None, 1: None, 2: None, 3: None, 4: None}, timeout)  # 3 never beat
    assert [rank for rank, _ in found] == [1, 4, 2]
    assert found[0][1].startswith("no heartbeat for ")


def test_the_heartbeat_keeps_beating_until_stopped(tmp_path):
    beat = Heartbeat.start(str(tmp_path), 4, collective_timeout_s=5)  # interval 0.5 s
    try:
        first = float(open(heartbeat_path(str(tmp_path), 4)).read())
        _wait_for(lambda: float(open(heartbeat_path(str(tmp_path), 4)).read()) > first, "no second beat")
    finally:
        beat.stop()
    assert heartbeat_age(str(tmp_path), 4) is not None
    assert heartbeat_age(str(tmp_path), 5) is None
