"""Checkpoints, resume and faults on the vocabulary-parallel engine (real processes, gloo)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest
from conftest import ON_CPU, run_cli, train_run
from test_baseline import HANG_GUARD_S, start_long_run, worker_pid
from wandb_reader import find_run_files, read_run

pytestmark = pytest.mark.distributed

RUN = (ON_CPU, "layout.pp=2", "method=vocab-2", "logger=none", "train.global_batch_size=4", "train.steps=4")


@pytest.mark.parametrize(("schedule", "precision"), [("1f1b", "fp32"), ("vhalf", "bf16")])
def test_resume_continues_the_identical_loss_trajectory_past_a_crash_during_save(tmp_path, schedule, precision):
    """fp32: the rank file holds torch AdamW's state; bf16: DeepSpeed's BF16_Optimizer's (fp32
    master weights, fragment mappings), read back with weights_only=True all the same.

    One uninterrupted run saves after steps 2 and 4. A copy of its directory is cut back to a job
    that died while saving step 4: the save's temporary directory half-written, `latest` still
    naming step 2, no summary.json, and (so that nothing of steps 3-4 is left for the resumed job to
    find) metrics.jsonl holding steps 1-2 only. Resuming it trains steps 3-4 again and cleans the
    torn save up."""
    run = (*RUN, f"schedule={schedule}", f"precision={precision}", "train.checkpoint_every=2")
    full = train_run(tmp_path / "full", *run)
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "full", split)
    ckpts = split / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    shutil.rmtree(ckpts / "step_00000004")
    torn = ckpts / ".tmp_step_00000004"
    torn.mkdir()
    (torn / "rank_0.pt").write_bytes(b"partial")
    (ckpts / "latest").write_text("step_00000002")
    (split / "summary.json").unlink()
    metrics = split / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))
    resumed = train_run(split, *run, "train.resume=auto")
    assert resumed["losses"] == full["losses"], "steps 3-4 after resuming must equal the uninterrupted run"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not torn.exists(), "the next save cleans up the torn one"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [(r["step"], r["train/loss"]) for r in rows]
    assert logged == list(enumerate(full["losses"], start=1)), "each step logged once"


def test_zero1_resume_after_losing_the_newest_checkpoint_is_bitwise_and_continues_its_wandb_run(tmp_path):
    """ZeRO-1 over dp=2 (the third optimizer state a rank file holds, after torch AdamW and
    BF16_Optimizer above). One uninterrupted run saves after steps 2 and 4; a copy of its
    directory loses step 4, so `latest` names a missing directory and metrics.jsonl holds two
    steps the resume redoes."""
    overrides = (ON_CPU, "layout.pp=2", "layout.dp=2", "method=vocab-1", "optim.zero_stage=1",
                 "train.global_batch_size=4", "train.steps=4", "logger=wandb", "logger.mode=offline")
    full = train_run(tmp_path / "full", *overrides, "train.checkpoint_every=2")
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "full", split)
    shutil.rmtree(split / "checkpoints" / "step_00000004")
    step2 = split / "checkpoints" / "step_00000002"
    proc = run_cli("train", f"hydra.run.dir={split}", *overrides, "train.resume=auto", check=True)
    assert f"resuming from the newest complete checkpoint, {step2}" in proc.stdout, proc.stdout[-3000:]
    resumed = json.loads((split / "summary.json").read_text())
    assert resumed["losses"] == full["losses"], "steps 3-4 after resuming must equal the uninterrupted run"
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "each step logged once"
    assert [r["train/loss"] for r in rows] == full["losses"]
    # The resumed job continues the W&B run its checkpoint recorded (the copied directory holds
    # the full run's file and the resumed job's).
    ids = [read_run(f).run_id for f in find_run_files(str(split))]
    assert len(ids) == 2 and set(ids) == {json.loads((step2 / "meta.json").read_text())["wandb_run_id"]}, ids


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", f"hydra.run.dir={run_dir}", *RUN[:-1], "train.steps=8", "train.checkpoint_every=1",
                   "optim=sgd", "optim.lr=1e12", "train.grad_clip=0", timeout=300)
    assert proc.returncode != 0
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert all(map(lambda x: x == x and abs(x) < float("inf"), meta["losses"])), "only finite steps were saved"
    kept = run_dir / "checkpoints" / latest
    assert f"The last checkpoint with finite weights is {kept}" in proc.stderr, proc.stderr[-3000:]
    from vptrain.checkpoint import first_non_finite, load_rank_file

    for rank in range(2):
        assert first_non_finite(load_rank_file(str(kept / f"rank_{rank}.pt"), deepspeed_state=True)) is None


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
    # Named: the rank that did not arrive, not its healthy peer that timed out waiting for it. The
    # launcher sees the process stopped; the peer itself (as under srun) sees its heartbeat stale.
    first_named = re.search(r"vptrain: rank (\d+) \(stage", err)
    assert first_named and first_named.group(1) == "1", err[-2000:]
    assert "rank 1 (stage 1, dp 0) stopped responding (its process is stopped (state T)" in err, err[-2000:]
    assert "vptrain: rank 0: rank 1 stopped responding (no heartbeat for" in err, err[-2000:]
    # What ended it is a collective timeout, whichever group the peer was waiting in (DeepSpeed's
    # groups get train.collective_timeout_s too: test_devices_and_timeouts.py). Gloo words it by
    # where the wait was: "Timed out waiting 10000ms for recv ..." in a p2p receive, "Application
    # timeout caused pair closure" in a collective's wait; which one a run hits depends on timing.
    assert re.search(r"timed out waiting 10000\s*ms|application timeout caused pair closure", err, re.I), err[-2000:]
