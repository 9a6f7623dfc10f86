"""Preemption on a real Slurm cluster: the pre-timeout signal makes every rank stop after the same
step with a checkpoint, the job requeues itself, and the next attempt resumes in the same run
directory and W&B run, ending exactly where an uninterrupted run ends. Both for `vptrain submit`
jobs and for Hydra's submitit launcher."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _slurm import job_state, log_tail, release_requeued, submit, summary, wait_done, wait_for
from conftest import REPO, cli_env, train_run
from wandb_reader import find_run_files, read_run

pytestmark = pytest.mark.slurm

# Enough steps (with a checkpoint after each) that the job is still training when it is signalled.
STEPS = 80
COMMON = ("method=baseline", "layout.pp=2", f"train.steps={STEPS}", "train.global_batch_size=8")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return train_run(tmp_path_factory.mktemp("uninterrupted"), *COMMON, "logger=none")


def signal_when_checkpointed(job: str, run_dir: Path) -> None:
    wait_for((run_dir / "checkpoints" / "latest").exists, 120, "the first checkpoint", run_dir, job, poll=0.1)
    # What `#SBATCH --signal=USR2@N` sends before the time limit, sent now, to every rank.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=20)


def test_signal_checkpoints_requeues_and_resumes_to_the_same_losses(tmp_path, slurm_cluster, uninterrupted):
    run_dir = tmp_path / "preempted"
    [job] = submit("cluster=slurm-dev", f"hydra.run.dir={run_dir}", *COMMON, "train.checkpoint_every=1",
                   "logger=wandb", "logger.mode=offline")
    signal_when_checkpointed(job, run_dir)
    release_requeued(job, run_dir)
    wait_done(job, run_dir, timeout=180)

    log = log_tail(run_dir, lines=1000)
    assert "requeueing job" in log and "attempt 2" in log, log
    assert not (run_dir / "preempted.json").exists(), "the finished attempt clears the requeue marker"
    stopped_at = int(re.search(rf"stopped after step (\d+)/{STEPS}", log).group(1))
    assert 0 < stopped_at < STEPS, f"the signal must land mid-run, got step {stopped_at}"
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log, log

    result = summary(run_dir)
    assert result["steps"] == STEPS
    assert result["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-6, abs=0)

    # Both attempts logged into the same W&B run; the second one knows it is a restart.
    files = find_run_files(str(run_dir))
    assert len(files) == 2, files
    first, second = (read_run(f) for f in files)
    assert first.run_id == second.run_id
    assert second.config["derived"]["slurm_restart_count"] == 1
    # Steps count optimizer steps done: the first attempt's last row is the checkpoint's step, the
    # requeued attempt continues with the next one.
    assert [h["_step"] for h in first.history if "train/loss" in h][-1] == stopped_at
    assert [h["_step"] for h in second.history if "train/loss" in h][0] == stopped_at + 1


def test_submitit_launcher_checkpoints_then_requeues(tmp_path, slurm_cluster, uninterrupted):
    sweep = tmp_path / "submitit"
    cmd = [sys.executable, "-m", "vptrain.cli", "train", "-m", "launcher=submitit_slurm", "cluster=slurm-dev",
           f"hydra.sweep.dir={sweep}", *COMMON, "train.checkpoint_every=1", "logger=none"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        run_dir = sweep / "0"
        wait_for(lambda: (sweep / ".submitit").exists() and list((sweep / ".submitit").iterdir()), 60,
                 "submitit's job folder", run_dir, "?")
        job = wait_for(lambda: next((p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()), None),
                       60, "the job id", run_dir, "?")
        signal_when_checkpointed(job, run_dir)
        release_requeued(job, run_dir)
        out, _ = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            subprocess.run(["scancel", job], timeout=20)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_0_log.out")))
    assert launcher.returncode == 0, f"{out[-3000:]}\n{logs[-3000:]}"
    assert "Requeued job" in logs and "resumed from" in logs, logs[-3000:]
    wait_for(lambda: job_state(job) == ("", ""), 60, "the job to leave the queue", run_dir, job)
    assert summary(run_dir)["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-6, abs=0)
