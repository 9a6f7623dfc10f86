"""`vptrain submit` on a real (one-machine) Slurm cluster: jobs train exactly like local runs, sweeps
become independent jobs that `vptrain compare` summarises, and W&B gets the right run metadata."""

from __future__ import annotations

import json

import pytest
from _slurm import job_state, log_tail, submit, summary, wait_done
from conftest import cli_env, run_cli, train_run
from wandb_reader import find_run_files, read_run

pytestmark = pytest.mark.slurm

STEPS = 40
COMMON = ("method=baseline", "layout.pp=2", f"train.steps={STEPS}", "train.global_batch_size=8")
SECRET = "vptrain-test-key-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory) -> list[float]:
    """The same config trained by `vptrain train` on this machine."""
    return train_run(tmp_path_factory.mktemp("local"), *COMMON, "logger=none")["losses"]


def test_jobs_on_one_and_two_nodes_train_like_a_local_run(tmp_path, slurm_cluster, local_losses):
    if slurm_cluster.nodes < 2:
        pytest.skip("needs two Slurm nodes (SLURM_FAKE_NODES=2 slurm/dev-cluster/up.sh)")
    one, two = tmp_path / "1x2", tmp_path / "2x1"
    env = cli_env(WANDB_API_KEY=SECRET)  # must reach the job through the environment only
    [job_one] = submit("cluster=slurm-dev", f"hydra.run.dir={one}", *COMMON, "logger=wandb", "logger.mode=offline",
                       env=env)
    [job_two] = submit("cluster=slurm-dev", "cluster.nodes=2", f"hydra.run.dir={two}", *COMMON, "logger=none")
    wait_done(job_one, one)
    wait_done(job_two, two)

    log_one, log_two = log_tail(one, lines=1000), log_tail(two, lines=1000)
    assert ": 2 ranks" in log_one and "n[1-2]" not in log_one, log_one
    assert "on n[1-2]: 2 ranks" in log_two, "the two-node job runs on both fake nodes\n" + log_two
    for run_dir in (one, two):
        assert summary(run_dir)["losses"] == pytest.approx(local_losses, rel=1e-6, abs=0), log_tail(run_dir)
    # Each rank's own log, as with the local launcher, beside the job's labelled slurm-<id>.out.
    for run_dir in (one, two):
        for rank in (0, 1):
            log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
            assert f"vptrain: rank {rank} of 2 on " in log, log[-2000:]
        assert f"step {STEPS:>5}/{STEPS} | loss" in (run_dir / "logs" / "rank_0.log").read_text()
    assert "#SBATCH --job-name=vptrain_" in (one / "job.sbatch").read_text()

    # W&B: one offline run, its id recorded in the checkpoint (a requeue continues it), the override signature as name,
    # the resolved config plus the derived layout, per-stage metrics under stable names.
    [wandb_file] = find_run_files(str(one))
    run = read_run(wandb_file)
    latest = (one / "checkpoints" / "latest").read_text()
    assert run.run_id == json.loads((one / "checkpoints" / latest / "meta.json").read_text())["wandb_run_id"]
    assert run.group == "default" and run.job_type == "train"
    assert run.name == ",".join(["cluster=slurm-dev", *COMMON])
    derived = run.config["derived"]
    assert derived["layers_per_stage"] == [2, 2] and derived["world_size"] == 2
    assert derived["vocab_rows_per_stage"] == [{"input": 512, "output": 0}, {"input": 0, "output": 512}]
    assert derived["rank_map"] == {"0": {"stage": 0, "dp": 0}, "1": {"stage": 1, "dp": 0}}
    assert derived["slurm_job_id"] == job_one
    assert run.config["cluster"]["name"] == "slurm-dev" and run.config["train"]["resume"] == "auto"
    last = run.history[-1]
    for key in ("train/loss", "throughput/tokens_per_s", "memory/stage_0/peak_bytes", "memory/stage_1/params_bytes",
                "time/stage_1/busy_s"):
        assert key in last, key
    for path in one.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_sweep_submits_one_job_per_point_and_compare_summarises_them(tmp_path, slurm_cluster):
    sweep = tmp_path / "vocab-sweep"
    jobs = submit("-m", "cluster=slurm-dev", f"hydra.sweep.dir={sweep}", "layout.pp=2", "train.steps=6",
                  "method=baseline", "model.vocab_size=256,1024", "logger=wandb", "logger.mode=offline")
    assert len(jobs) == 2 and len(set(jobs)) == 2
    # submit returns without waiting for the jobs: they are still queued or running (a job takes
    # seconds just to import torch). A check on the state, not on how long submit took.
    assert any(job_state(job)[0] for job in jobs), "submit waited for the jobs to finish"
    for job, point in zip(jobs, ("0", "1"), strict=True):
        wait_done(job, sweep / point)

    groups, names = set(), set()
    for point, vocab in (("0", 256), ("1", 1024)):
        assert summary(sweep / point)["vocab_size"] == vocab
        run = read_run(find_run_files(str(sweep / point))[0])
        groups.add(run.group)
        names.add(run.name)
    assert groups == {"default-vocab-sweep"}, "one W&B group per sweep"
    assert len(names) == 2

    proc = run_cli("compare", str(sweep), timeout=120, check=True)
    table = (sweep / "comparison.md").read_text()
    for vocab in (256, 1024):  # each point named by what varies in the sweep, not by its directory
        assert f"| model.vocab_size={vocab} | measured | baseline | 1f1b | 2 | 1 | {vocab} | 1 | 6/6 |" in table, table
    assert "wrote" in proc.stdout
    csv_lines = (sweep / "comparison.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "stage_1_peak_memory_bytes" in csv_lines[0]
    for png in ("throughput_vs_vocab.png", "peak_memory_vs_vocab.png", "busy_per_stage.png", "loss_vs_step.png"):
        data = (sweep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
