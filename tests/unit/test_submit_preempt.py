"""Preemption on this machine, no Slurm: a signal that reaches only one rank still stops every rank
after the same step, with one checkpoint and the marker that makes a Slurm job requeue itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env

pytestmark = pytest.mark.distributed


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of the worker processes the local launcher started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
        if ppid == parent and rank is not None:
            found[int(rank)] = int(entry.name)
    return found


def test_signal_to_one_rank_stops_all_ranks_after_the_same_step(tmp_path):
    steps = 100
    proc = subprocess.Popen(
        [sys.executable, "-m", "vptrain.cli", "train", f"hydra.run.dir={tmp_path}", "method=baseline", "layout.pp=2",
         f"train.steps={steps}", "train.checkpoint_every=1", "logger=none"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 600  # hang guards (here and below), not speed limits: load varies
        while not (tmp_path / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        ranks = _workers(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR2)  # rank 1 only: rank 0 must learn it from the all-reduce
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    marker = json.loads((tmp_path / "preempted.json").read_text())
    stopped = marker["step"]
    assert 0 < stopped < steps and marker["signal"] == "another rank", marker  # rank 0 writes it
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert f"stopped after step {stopped}/{steps}" in out, out[-3000:]
    assert "got SIGUSR2" in (tmp_path / "logs" / "rank_1.log").read_text()
    assert "got SIGUSR2" not in (tmp_path / "logs" / "rank_0.log").read_text()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == stopped, "every rank stopped after the same step"
