"""Hydra's submitit launcher (launcher=submitit_slurm): each sweep point runs as a Slurm job whose
tasks are the ranks. (That such a job trains exactly like a local run, through a requeue even, is
checked in test_preempt_requeue.py.)"""

from __future__ import annotations

import pytest
from conftest import run_cli
from wandb_reader import find_run_files, read_run

pytestmark = pytest.mark.slurm

COMMON = ("method=baseline", "layout.pp=2", "train.steps=20", "train.global_batch_size=8")


def test_submitit_sweep_runs_ranks_as_slurm_tasks(tmp_path, slurm_cluster):
    sweep = tmp_path / "submitit-sweep"
    proc = run_cli("train", "-m", "launcher=submitit_slurm", "cluster=slurm-dev", f"hydra.sweep.dir={sweep}",
                   *COMMON, "model.vocab_size=512,256", "logger=wandb", "logger.mode=offline", timeout=300)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sweep.glob(".submitit/*/*_log.out"))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"

    for point, vocab in (("0", 512), ("1", 256)):
        run = read_run(find_run_files(str(sweep / point))[0])
        assert run.config["model"]["vocab_size"] == vocab
        assert run.config["derived"]["world_size"] == 2 and run.config["derived"]["slurm_job_id"]
        assert run.group == "default-submitit-sweep"
        losses = [h["train/loss"] for h in run.history if "train/loss" in h]
        assert len(losses) == 20 and losses[-1] < losses[0]
    # Two ranks per job: rank 0 and rank 1 each logged from their own Slurm task.
    task_logs = sorted(p.name for p in sweep.glob(".submitit/*_0/*_log.out"))
    assert len(task_logs) == 2, task_logs
