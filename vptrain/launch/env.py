"""Where a worker's rank comes from: torchrun-style variables or Slurm's."""

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
