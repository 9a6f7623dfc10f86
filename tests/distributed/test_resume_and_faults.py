"""Checkpoints, resume and faults on the vocabulary-parallel engine (real processes, gloo)."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from conftest import run_cli, train_run
from test_baseline import HANG_GUARD_S, start_long_run, worker_pid

pytestmark = pytest.mark.distributed

RUN = ("layout.pp=2", "method=vocab-2", "logger=none", "train.global_batch_size=4", "train.steps=4")


@pytest.mark.parametrize("schedule", ["1f1b", "vhalf"])
def test_resume_continues_the_identical_loss_trajectory(tmp_path, schedule):
    full = train_run(tmp_path / "full", *RUN, f"schedule={schedule}")
    stopped = train_run(tmp_path / "split", *RUN, f"schedule={schedule}", "train.stop_at_step=2")
    assert len(stopped["losses"]) == 2
    resumed = train_run(tmp_path / "split", *RUN, f"schedule={schedule}", "train.resume=auto")
    assert resumed["losses"] == full["losses"], "steps 3-4 after resuming must equal the uninterrupted run"
    latest = (tmp_path / "split" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000004"


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_dir, *RUN, "train.stop_at_step=2")
    ckpts = run_dir / "checkpoints"
    # A save that died half-way: its temporary directory exists, `latest` still names step 2.
    (ckpts / ".tmp_step_00000003").mkdir()
    (ckpts / ".tmp_step_00000003" / "rank_0.pt").write_bytes(b"partial")
    resumed = train_run(run_dir, *RUN, "train.resume=auto")
    assert len(resumed["losses"]) == 4
    assert not (ckpts / ".tmp_step_00000003").exists(), "the next save cleans up the torn one"


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", f"hydra.run.dir={run_dir}", *RUN[:-1], "train.steps=8", "train.checkpoint_every=1",
                   "optim=sgd", "optim.lr=1e12", "train.grad_clip=0", timeout=300)
    assert proc.returncode != 0
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert all(map(lambda x: x == x and abs(x) < float("inf"), meta["losses"])), "only finite steps were saved"


def test_a_stuck_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, *RUN[:-1], "train.collective_timeout_s=10")
    victim = worker_pid(run_dir, rank=1)
    os.kill(victim, signal.SIGSTOP)  # alive but never answering: its peer waits in a collective / p2p
    try:
        # Without the collective timeout the job would never end: HANG_GUARD_S only turns that into
        # a failure instead of a hung suite. How soon it ends depends on the machine's load.
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 0" in err, err[-2000:]
    # What ended it is a collective timeout, whichever group the peer was waiting in (DeepSpeed's
    # groups get train.collective_timeout_s too: test_devices_and_timeouts.py). Gloo words it by
    # where the wait was: "Timed out waiting 10000ms for recv ..." in a p2p receive, "Application
    # timeout caused pair closure" in a collective's wait; which one a run hits depends on timing.
    assert re.search(r"timed out waiting 10000\s*ms|application timeout caused pair closure", err, re.I), err[-2000:]
