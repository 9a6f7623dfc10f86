"""`vptrain submit` without a cluster: the rendered sbatch script, cluster checks with clear errors,
and the submitit launcher preset's composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir

from vptrain.config import register_configs
from vptrain.launch.sbatch import fill, time_limit_s

GOLDEN = REPO / "tests" / "golden" / "sbatch_4x8.txt"
CONFIG_ERROR = 2

GPU_4X8 = (
    "cluster=h100", "cluster.nodes=4", "layout.pp=8", "layout.dp=4", "model=gpt-4b", "precision=bf16",
    "cluster.partition=gpu", "cluster.account=vocab-lab", "cluster.qos=high", "cluster.time=12:00:00",
    "cluster.mem_gb=480", "cluster.cpus_per_task=12", "cluster.python=/opt/vptrain/.venv/bin/python",
    "cluster.setup=['module load cuda/12.4']", "cluster.extra_sbatch=[--exclusive]", "method=vocab-2",
    "cluster.network_interface=ib0", "+cluster.env.NCCL_IB_HCA=mlx5",
)


def dry_run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("submit", "--dry-run", f"hydra.run.dir={run_dir}", *overrides, timeout=120)


def test_rendered_4_node_8_gpu_script_matches_the_golden_file(tmp_path):
    proc = dry_run(tmp_path / "run", *GPU_4X8)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.replace(str(tmp_path / "run"), "<RUN_DIR>").replace(str(REPO), "<REPO>")
    if os.environ.get("VPTRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert GOLDEN.exists(), f"missing {GOLDEN}; run with VPTRAIN_UPDATE_GOLDEN=1"
    assert script == GOLDEN.read_text(), "the rendered script changed; review it, then VPTRAIN_UPDATE_GOLDEN=1"
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --gpu-bind=closest", "#SBATCH --cpus-per-task=12", "#SBATCH --mem=480G",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --output=<RUN_DIR>/slurm-%j.out",
                 "#SBATCH --exclusive", "module load cuda/12.4", "export NCCL_DEBUG=WARN",
                 "export NCCL_SOCKET_IFNAME=ib0", "export GLOO_SOCKET_IFNAME=ib0", "export NCCL_IB_HCA=mlx5",
                 "#SBATCH --job-name=vptrain_pp8_dp4_gpt-4b_bf16_vocab-2",
                 "trap 'echo \"vptrain: batch shell got SIGTERM; the ranks checkpoint and stop\"' TERM",
                 "srun --label --kill-on-bad-exit=1 --cpus-per-task=12 --cpu-bind=cores "):
        assert line in script, line
    assert "--gpus-per-node" not in script
    assert "DS_ACCELERATOR=cpu" not in script
    # The script is valid bash, and dry runs submit nothing.
    check = subprocess.run(["bash", "-n"], input=proc.stdout, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert not (tmp_path / "run" / "job.sbatch").exists()


def test_cpu_cluster_runs_pp_times_dp_over_nodes_tasks(tmp_path):
    proc = dry_run(tmp_path / "run", "cluster=slurm-dev", "cluster.nodes=2", "layout.pp=2", "layout.dp=2")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n" in proc.stdout
    assert "--gpus-per-node" not in proc.stdout and "export DS_ACCELERATOR=cpu" in proc.stdout


@pytest.mark.parametrize("preset", ["h100", "a100"])
def test_gpu_presets_give_each_rank_cores_and_the_job_whole_nodes(tmp_path, preset):
    proc = dry_run(tmp_path / "run", f"cluster={preset}", "cluster.nodes=4", "model=gpt-4b", "layout.pp=8",
                   "layout.dp=4", "cluster.partition=gpu")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --cpus-per-task=8\n" in proc.stdout and "#SBATCH --exclusive\n" in proc.stdout


def test_cluster_workdir_keeps_the_submitting_machines_paths_out(tmp_path):
    """The cluster's checkout elsewhere: the job runs there, finds its worker there and takes
    python3 from the PATH its setup leaves; only the (shared) run directory is named."""
    proc = dry_run(tmp_path / "run", *GPU_4X8[:10], "cluster.workdir=/cluster/vptrain", "cluster.gpu_bind=null",
                   "cluster.mem_gb=null", "cluster.mem_per_gpu_gb=60")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "cd /cluster/vptrain ||" in script and " /cluster/vptrain/launchers/srun_worker.sh \"$RUN_DIR\"" in script
    assert "export VPTRAIN_PYTHON=python3\n" in script
    assert str(REPO) not in script and sys.executable not in script
    assert "#SBATCH --gpus-per-node=8\n" in script and "--gpus-per-task" not in script and "--gpu-bind" not in script
    assert "#SBATCH --mem-per-gpu=60G\n" in script and "--mem=" not in script


def test_job_names_say_what_the_run_is(tmp_path):
    proc = dry_run(tmp_path / "run", "cluster=slurm-dev", "experiment=quickstart", "method=vocab-1",
                   "model.vocab_size=4096", "cluster.time=00:30:00", "logger=none")
    assert "#SBATCH --job-name=vptrain_quickstart_vocab-1_vocab_size4096\n" in proc.stdout, proc.stdout[:500]
    proc = dry_run(tmp_path / "run2", "cluster=slurm-dev", "cluster.job_name=mine")
    assert "#SBATCH --job-name=mine\n" in proc.stdout


def test_the_api_key_never_enters_the_script(tmp_path):
    secret = "wandb-key-that-must-stay-in-the-environment"
    env = dict(os.environ, WANDB_API_KEY=secret)
    proc = run_cli("submit", "--dry-run", f"hydra.run.dir={tmp_path}", "cluster=slurm-dev", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("cluster=slurm-dev", "cluster.nodes=0"), "cluster.nodes: must be >= 1"),
        (("cluster=h100", "layout.pp=4", "layout.dp=4"), "cluster.nodes: 16 tasks per node"),
        (("cluster=slurm-dev", "cluster.nodes=2", "layout.pp=3"), "3 ranks cannot be split evenly over 2 nodes"),
        (("cluster=h100", "cluster.require_partition=true"), "cluster.partition: this cluster has no default"),
        (("cluster=h100", "cluster.gpus_per_node=0"), "cluster.gpus_per_node: cluster.device=cuda needs GPUs"),
        (("cluster=slurm-dev", "cluster.time=soon"), "cluster.time: 'soon' is not a Slurm time limit"),
        (("cluster=slurm-dev", "cluster.time=10", "cluster.signal_delay_s=900"), "cluster.signal_delay_s: 900 s"),
        (("cluster=slurm-dev", "cluster.signal=KILL"), "cluster.signal: 'KILL'"),
        (("cluster=slurm-dev", "cluster.extra_sbatch=[exclusive]"), "cluster.extra_sbatch: 'exclusive'"),
        (("cluster=h100", "cluster.mem_gb=400", "cluster.mem_per_gpu_gb=50"), "cluster.mem_per_gpu_gb: set"),
        (("cluster=slurm-dev", "cluster.mem_per_gpu_gb=50"), "cluster.mem_per_gpu_gb: must be >= 1 GB, on a GPU"),
        (("cluster=slurm-dev", "+cluster.env.bad-name=x"), "cluster.env: 'bad-name'"),
        (("cluster=h100", "cluster.network_interface='ib0;reboot'"), "cluster.network_interface: 'ib0;reboot'"),
    ],
    ids=["0-nodes", "tasks-over-gpus", "uneven-nodes", "no-partition", "cuda-without-gpus", "bad-time",
         "signal-after-end", "bad-signal", "bad-extra", "two-mems", "mem-per-gpu-on-cpu", "bad-env-name",
         "bad-interface"],
)
def test_bad_cluster_configs_fail_before_submitting(tmp_path, overrides, message):
    proc = dry_run(tmp_path / "run", *overrides)
    assert proc.returncode == CONFIG_ERROR, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_submit_without_sbatch_says_what_to_do(tmp_path):
    env = dict(os.environ, PATH=str(Path(os.sys.executable).parent))  # python only: no sbatch, squeue
    proc = run_cli("submit", f"hydra.run.dir={tmp_path}", "cluster=slurm-dev", env=env, timeout=120)
    assert proc.returncode == 1
    assert "sbatch not found" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.parametrize(("text", "seconds"), [("90", 5400), ("1:30", 90), ("01:00:00", 3600), ("2-00", 172800),
                                               ("1-02:03", 93780), ("1-00:00:05", 86405)])
def test_slurm_time_limits(text, seconds):
    assert time_limit_s(text) == seconds


def test_template_placeholders_must_all_have_values():
    assert fill("a {{x}} ${HOME} %j", {"x": "1"}) == "a 1 ${HOME} %j"
    with pytest.raises(KeyError, match="y"):
        fill("{{y}}", {})


def test_submitit_preset_sizes_the_slurm_job_from_the_layout():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["launcher=submitit_slurm", "cluster=slurm-dev", "cluster.nodes=2",
                                           "layout.pp=2", "layout.dp=2", "cluster.time=01:30:00"],
                      return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 2, None)
        assert launcher.timeout_min == 90 and launcher.signal_delay_s == 60 and launcher.max_num_timeout == 3
        assert any("MASTER_ADDR" in line for line in launcher.setup)
        assert cfg.launcher.name == "submitit_slurm"
        gpu = compose("config", overrides=["launcher=submitit_slurm", "cluster=h100", "cluster.nodes=2",
                                           "layout.pp=8", "layout.dp=2"], return_hydra_config=True)
        assert (gpu.hydra.launcher.tasks_per_node, gpu.hydra.launcher.gpus_per_node) == (8, 8)
