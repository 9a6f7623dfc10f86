"""Where a worker's rank comes from (torchrun-style variables or Slurm's), and what follows from it:
the CUDA device it drives, and the NCCL variables set before its process group starts."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def external_launch(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The rank layout set by an external launcher, or None when vptrain must start the ranks.

    torchrun/vptrain's own launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under
    `srun` without them, ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and the sbatch
    script exports MASTER_ADDR/MASTER_PORT (first host, a port derived from the job id).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID is only set inside an srun step, not in the batch script itself.
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        return None
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", "29500"))
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, master_addr=addr, master_port=port)


def export(launch: LaunchEnv, environ: dict[str, str] | None = None) -> None:
    """Write the torch.distributed variables (env:// rendezvous) for this rank."""
    env = os.environ if environ is None else environ
    env["RANK"] = str(launch.rank)
    env["WORLD_SIZE"] = str(launch.world_size)
    env["LOCAL_RANK"] = str(launch.local_rank)
    env["MASTER_ADDR"] = launch.master_addr
    env["MASTER_PORT"] = str(launch.master_port)


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device a rank drives, as an index into the devices its process can see.

    - one device visible: 0, whatever the local rank. Slurm's per-task binding (--gpus-per-task=1,
      --gpu-bind=single:1) leaves each task one entry in CUDA_VISIBLE_DEVICES while SLURM_LOCALID
      (hence LOCAL_RANK) still counts 0..n-1 on the node;
    - several visible: the local rank's own (torchrun, vptrain's launcher, srun without binding);
    - a local rank beyond the visible devices is an error: wrapping it around (local_rank % count)
      would put two ranks on one GPU, which NCCL rejects mid-run or silently halves the speed.
    """
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank}: must be >= 0")
    if visible_devices < 1:
        raise ValueError("cluster.device=cuda but no CUDA device is visible to this process "
                         "(check CUDA_VISIBLE_DEVICES and the job's GPU request)")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise ValueError(f"LOCAL_RANK={local_rank} but this process sees only {visible_devices} CUDA devices: "
                         f"start at most {visible_devices} ranks per node (cluster.gpus_per_node), or bind one "
                         "GPU per task (srun --gpus-per-task=1)")
    return local_rank


# Set before NCCL's process group is created, unless the user already chose a value.
# ASYNC_ERROR_HANDLING=1: when a collective outlives train.collective_timeout_s (or fails), NCCL's
# watchdog aborts the communicators and ends the process, so the launcher sees the rank exit and
# names it. torch's default has changed across versions (0, no handling, in older ones: a rank
# whose peer died then waits forever); set explicitly, it holds whichever torch a cluster installs.
# BLOCKING_WAIT is left unset on purpose: it turns every work.wait() into a host wait for the GPU,
# which would serialise the pipeline at every collective a pass waits for, and the watchdog above
# already enforces the timeout.
NCCL_ENV_DEFAULTS = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def nccl_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to add to `environ` before NCCL initialises (the user's own values win)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in NCCL_ENV_DEFAULTS.items() if k not in env}
