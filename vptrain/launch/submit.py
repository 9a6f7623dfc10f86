"""`vptrain submit`: one sbatch job per config, fire and forget.

Writes run_dir/config.yaml (what every rank reads) and run_dir/job.sbatch, submits it with
`sbatch --parsable`, prints the job id and returns. A multirun calls this once per point, each with
its own run directory, so a sweep becomes independent jobs that need no process to watch them.
`--dry-run` prints the script and submits nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

from vptrain.config import RunConfig
from vptrain.launch.entry import write_run_dir
from vptrain.launch.sbatch import job_shape, render
from vptrain.run_lock import ensure_free

JOB_FILE = "job.sbatch"
JOB_ID_FILE = "slurm_job_id"
SBATCH_TIMEOUT_S = 60


class SubmitError(RuntimeError):
    """Slurm refused or is missing; not a config mistake."""


def for_slurm(cfg: RunConfig) -> RunConfig:
    """The config the job runs: a requeued attempt must resume, so `never` becomes `auto` (the same
    thing for a fresh run directory). An explicit checkpoint path is kept."""
    if cfg.train.resume != "never":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))


def _write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _still_queued(run_dir: str) -> str | None:
    """The id of an earlier job of this run directory that Slurm still knows as queued or running."""
    path = os.path.join(run_dir, JOB_ID_FILE)
    if not os.path.exists(path) or shutil.which("squeue") is None:
        return None
    with open(path) as f:
        job_id = f.read().strip()
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=SBATCH_TIMEOUT_S)
    return job_id if out.returncode == 0 and out.stdout.strip() else None


def find_sbatch() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found: run this on a Slurm login node (or start the dev cluster, "
                          "slurm/dev-cluster/up.sh); `vptrain submit --dry-run` prints the script")
    return exe


def sbatch(script_path: str) -> str:
    proc = subprocess.run([find_sbatch(), "--parsable", script_path], capture_output=True, text=True,
                          timeout=SBATCH_TIMEOUT_S)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>"
    return proc.stdout.strip().split(";")[0]


def submit(cfg: RunConfig, flags: list[str] | None = None) -> int:
    flags = list(flags or [])
    cfg = for_slurm(cfg)
    shape = job_shape(cfg)
    script = render(cfg, workdir=os.getcwd())
    if "--dry-run" in flags:
        print(script, end="")
        return 0
    running = _still_queued(cfg.run_dir)
    if running:
        raise ValueError(f"hydra.run.dir: job {running} of {cfg.run_dir} is still queued or running; "
                         f"wait for it, `scancel {running}`, or choose another run directory")
    ensure_free(cfg.run_dir)  # a job running there now (e.g. a local `vptrain train`) keeps its config.yaml
    try:
        find_sbatch()
        write_run_dir(cfg)
        script_path = os.path.join(cfg.run_dir, JOB_FILE)
        _write_atomic(script_path, script, mode=0o755)
        job_id = sbatch(script_path)
    except (SubmitError, subprocess.TimeoutExpired) as err:
        print(f"vptrain submit: {err}", file=sys.stderr, flush=True)
        return 1
    _write_atomic(os.path.join(cfg.run_dir, JOB_ID_FILE), job_id + "\n")
    print(f"vptrain: submitted job {job_id} ({shape.nodes} node(s) x {shape.tasks_per_node} task(s)); "
          f"run directory {cfg.run_dir}; log {os.path.join(cfg.run_dir, f'slurm-{job_id}.out')}", flush=True)
    return 0
