#!/usr/bin/env bash
# Stop the development cluster started by up.sh: cancel its jobs, then stop slurmd, slurmctld and
# munged by the pids in their pid files (never by process name). Idempotent.
#   --purge   also remove Slurm's state, spool and log directories and slurm.conf
#             (the packages and the munge key stay).
set -uo pipefail
say() { echo "[dev-cluster down] $*"; }
PIDS=/run/slurm

stop_by_pidfile() {  # pidfile, label
  [ -s "$1" ] || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { say "$2 still running; SIGKILL"; kill -KILL "$pid" 2>/dev/null; }
  fi
  rm -f "$1"
}

# Jobs first, so no job step outlives the daemons that supervise it.
if command -v scontrol >/dev/null 2>&1 && scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %i 2>/dev/null | xargs)
  if [ -n "$jobs" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086 - one argument per job id
    scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for f in "$PIDS"/slurmd-*.pid; do
  [ -e "$f" ] || continue
  name=$(basename "$f" .pid); stop_by_pidfile "$f" "slurmd ${name#slurmd-}"
done
stop_by_pidfile "$PIDS/slurmctld.pid" slurmctld
stop_by_pidfile /run/munge/munged.pid munged
rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock

if [ "${1:-}" = "--purge" ]; then
  say "removing state, spool and logs"
  rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$PIDS" /etc/slurm/slurm.conf
fi
say "stopped"
