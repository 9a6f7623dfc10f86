#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine: munged, slurmctld and one slurmd per fake node.
# For tests, CI and trying `vptrain submit` without a cluster. Debian 12 packages, no systemd.
#
# Idempotent: a second run only starts what is not running. When the node layout changes it
# restarts the daemons it started (found by their pid files, never by name).
#
#   SLURM_FAKE_NODES=N   nodes n1..nN on this host (default 1: one node named after the host).
#                        Two are what the multi-node tests need; every fake node advertises all
#                        host CPUs, so jobs on different fake nodes share the real cores.
#   SLURM_SKIP_INSTALL=1 never call apt-get (fail if a binary is missing).
#   SLURM_WAIT_S=60      how long to wait for the nodes to become idle.
set -euo pipefail

say() { echo "[dev-cluster up] $*"; }
fail() { echo "[dev-cluster up] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts system daemons)"

NODES="${SLURM_FAKE_NODES:-1}"
WAIT_S="${SLURM_WAIT_S:-60}"
case "$NODES" in ''|*[!0-9]*|0) fail "SLURM_FAKE_NODES must be a positive integer, got '$NODES'";; esac

ETC=/etc/slurm
CONF="$ETC/slurm.conf"
PIDS=/run/slurm
LOGS=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
began=$(date +%s)

have_all() { for b in "$@"; do command -v "$b" >/dev/null 2>&1 || return 1; done; }

# --- packages -----------------------------------------------------------------------------------
if ! have_all slurmctld slurmd sbatch munged; then
  [ -z "${SLURM_SKIP_INSTALL:-}" ] || fail "Slurm is not installed and SLURM_SKIP_INSTALL is set"
  say "installing slurm-wlm and munge"
  apt_log="${TMPDIR:-/tmp}/dev-cluster-apt.log"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
          slurm-wlm slurmctld slurmd slurm-client munge; } >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    fail "package installation failed (full log: $apt_log)"
  fi
fi
have_all slurmctld slurmd sbatch srun scontrol sinfo munged munge unmunge || fail "a Slurm or munge binary is missing"

# --- names must resolve: the controller's host and every fake node (jobs use the first node's
# name as MASTER_ADDR) ------------------------------------------------------------------------------
HOST="$(hostname -s)"
resolve_locally() { getent hosts "$1" >/dev/null 2>&1 || { say "mapping $1 to 127.0.0.1 in /etc/hosts"; echo "127.0.0.1 $1" >>/etc/hosts; }; }
resolve_locally "$HOST"
resolve_locally localhost

# --- munge (the daemons authenticate each other with it) ------------------------------------------
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge   # a tmpfs directory nobody creates without systemd
if [ ! -s /etc/munge/munge.key ]; then
  say "creating a munge key"
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force --keyfile=/etc/munge/munge.key
  else head -c 1024 /dev/urandom >/etc/munge/munge.key; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if alive /run/munge/munged.pid && munge_ok; then
  say "munged is running"
else
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --num-threads=4 || fail "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || fail "munge cannot encode/decode a credential (see /var/log/munge/munged.log)"
fi

# --- slurm.conf from what slurmd detects on this machine -------------------------------------------
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | awk '
  /^NodeName=/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
  END { print v["CPUs"], v["Boards"] * v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
[ "${CPUS:-0}" -ge 1 ] 2>/dev/null || fail "could not read the hardware from 'slurmd -C'"
MEM=$(( MEM * 9 / 10 / NODES ))   # headroom for the host, split between the fake nodes
[ "$MEM" -ge 256 ] || MEM=256
HW="CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM"
if [ "$NODES" -eq 1 ]; then
  NODELIST="$HOST"
  NODE_LINE="NodeName=$HOST NodeAddr=127.0.0.1 $HW State=UNKNOWN"
else
  # Several slurmd on one host: one name and one port each, all at the loopback address.
  NODELIST="n[1-$NODES]"
  NODE_LINE="NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] $HW State=UNKNOWN"
fi

WANT=$(cat <<CONF
# Written by slurm/dev-cluster/up.sh: a one-machine development cluster.
ClusterName=vptrain-dev
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
$NODE_LINE
PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)

install -d -m 0755 "$ETC" "$PIDS" "$LOGS" "$CTLD_STATE" "$SPOOL"
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANT" ]; then
  printf '%s\n' "$WANT" >"$CONF"
  changed=1
  say "wrote $CONF ($NODELIST)"
fi
NODE_NAMES=$(scontrol show hostnames "$NODELIST")
for n in $NODE_NAMES; do
  install -d -m 0755 "$SPOOL/$n"
  resolve_locally "$n"
done

# --- daemons ----------------------------------------------------------------------------------------
stop_by_pidfile() {
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}
if [ "$changed" -eq 1 ]; then
  for f in "$PIDS"/slurmd-*.pid "$PIDS/slurmctld.pid"; do [ -e "$f" ] && stop_by_pidfile "$f"; done
fi

if alive "$PIDS/slurmctld.pid"; then
  say "slurmctld is running"
else
  say "starting slurmctld"
  slurmctld -i || { tail -n 20 "$LOGS/slurmctld.log" >&2; fail "slurmctld did not start"; }
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || { tail -n 20 "$LOGS/slurmctld.log" >&2; fail "slurmctld does not answer"; }

for n in $NODE_NAMES; do
  if alive "$PIDS/slurmd-$n.pid"; then
    say "slurmd $n is running"
  else
    say "starting slurmd $n"
    slurmd -N "$n" || { tail -n 20 "$LOGS/slurmd-$n.log" >&2; fail "slurmd $n did not start"; }
  fi
done

# --- wait until every node takes jobs ------------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
  states=$(sinfo -h -N -o '%N %T' -n "$NODELIST" 2>/dev/null || true)
  not_ready=$(printf '%s\n' "$states" | awk 'NF && $2 !~ /^(idle|mixed|allocated|completing)/' | wc -l)
  [ -n "$states" ] && [ "$not_ready" -eq 0 ] && break
  if printf '%s\n' "$states" | grep -Eq 'down|drain'; then
    for n in $NODE_NAMES; do scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    printf '%s\n' "$states" >&2
    tail -n 20 "$LOGS/slurmctld.log" >&2
    fail "nodes not idle after ${WAIT_S}s"
  fi
  sleep 0.5
done
say "ready in $(( $(date +%s) - began ))s: $NODELIST"
sinfo
