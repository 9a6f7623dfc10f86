#!/usr/bin/env bash
# One rank of a vptrain Slurm job: `srun launchers/srun_worker.sh RUN_DIR`, one task per rank.
#
# Slurm numbers the tasks (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); torch.distributed's env://
# convention wants RANK/WORLD_SIZE/LOCAL_RANK, so they are translated here and the worker needs
# nothing Slurm-specific. MASTER_ADDR/MASTER_PORT come from the batch script (first node of the
# allocation, a port derived from the job id). `exec` keeps the Python process as the task itself,
# so Slurm's signals (pre-timeout, preemption) reach it directly.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: srun [...] $0 RUN_DIR" >&2
  exit 2
fi
: "${SLURM_PROCID:?not inside an srun step}" "${SLURM_NTASKS:?not inside an srun step}"
: "${MASTER_ADDR:?the batch script exports MASTER_ADDR}" "${MASTER_PORT:?the batch script exports MASTER_PORT}"

export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="${SLURM_LOCALID:-0}"
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
  export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE%%(*}"  # "8(x4)" on some versions
fi
# Each rank's output also goes to RUN_DIR/logs/rank_<r>.log, as with the local launcher (appended:
# a requeued attempt continues the file). tee ignores the signals Slurm sends the step, so it
# outlives the rank's checkpoint on SIGTERM/USR2 and still has the rank's last lines.
mkdir -p "$1/logs"
exec > >(trap '' TERM INT HUP USR1 USR2; exec tee -a "$1/logs/rank_${RANK}.log") 2>&1
echo "vptrain: rank $RANK of $WORLD_SIZE on $(hostname), job ${SLURM_JOB_ID:-?} attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )), $(date -Is)"
exec "${VPTRAIN_PYTHON:-python3}" -m vptrain.launch.worker "$1"
