"""The local launcher (`vptrain train`) under signals and a second job: its ranks never outlive it,
SIGTERM stops them after a common step with a checkpoint, and a second job on the same run
directory is refused before it writes anything there. Real runs (pp=2, gloo)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import ON_CPU, run_cli
from test_baseline import HANG_GUARD_S, start_long_run

from vptrain.launch.liveness import process_state
from vptrain.run_lock import RunDirInUse, acquire

pytestmark = pytest.mark.distributed

RUN = (ON_CPU, "method=baseline", "layout.pp=2", "logger=none")
GONE_WITHIN_S = 30.0  # a deadline for liveness on a loaded machine, not a timing assertion


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes whose parent is the launcher and that carry a RANK."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((v[5:] for v in env if v.startswith(b"RANK=")), None)
        if ppid == launcher and rank is not None:
            found[int(rank)] = int(pid)
    return found


def gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z", "X")  # a zombie has exited; reaping it is init's business


def wait_until_gone(pids: list[int], what: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            alive = [p for p in pids if not gone(p)]
            for p in alive:
                os.kill(p, signal.SIGKILL)  # do not leave them training for the rest of the suite
            pytest.fail(f"{what}: workers {alive} still running {GONE_WITHIN_S:.0f} s later")
        time.sleep(0.1)


def test_killing_the_launcher_ends_every_rank_and_frees_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, *RUN)
    ranks = worker_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    proc.kill()  # SIGKILL: the launcher runs no cleanup at all
    proc.communicate()
    wait_until_gone(list(ranks.values()), "SIGKILL of the launcher")
    # The ranks held the run directory's lock with the launcher: free once the last one is gone. A
    # killed process's leader can read as a zombie while its other threads still hold the files
    # open, so the lock may take a moment longer to drop.
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        try:
            acquire(str(run_dir)).release()
            break
        except RunDirInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_second_job_is_refused_and_sigterm_stops_the_first_with_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, *RUN)
    try:
        ranks = worker_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "yaml" in p.name}
        assert run_dir / "config.yaml" in before

        # A second job on the same run directory (with another config): one line, exit 2, and the
        # first job's resolved config (and Hydra's record of it) untouched.
        second = run_cli("train", f"hydra.run.dir={run_dir}", *RUN, "train.seed=7", "train.steps=3", timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"{run_dir} is in use by another vptrain job (pid {proc.pid} on host" in lines[0]
        assert "hydra.run.dir" in lines[0] and "Traceback" not in second.stderr + second.stdout
        assert {p: p.read_bytes() for p in before} == before, "the second job overwrote the first one's config"

        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_GUARD_S)  # a hang guard, not a speed limit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "vptrain: got SIGTERM; every rank stops after its current step" in err, err[-3000:]
    assert "vptrain: stopped on SIGTERM: every rank finished its step and exited" in err, err[-3000:]
    assert all(gone(p) for p in ranks.values())
    # Stopped cleanly: every rank after the same step, with a checkpoint of that step.
    stopped = json.loads((run_dir / "preempted.json").read_text())["step"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == stopped
    assert f"stopped after step {stopped}/" in out, out[-3000:]
    for rank in ranks:
        assert "got SIGUSR2; stopping with a checkpoint after this step" in (
            run_dir / "logs" / f"rank_{rank}.log").read_text()
