"""Start pp * dp worker processes on this machine and watch them.

Each rank's output goes to run_dir/logs/rank_<r>.log; the logging rank's output is also shown on
the console. When any rank exits non-zero the others are stopped at once (a dead rank must never
leave its peers hanging in a collective) and the failing rank is named with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

GRACE_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    log_path: str
    pump: threading.Thread | None = None


def _pump(stream, log_path: str, echo: bool) -> None:
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


def run_local(run_dir: str, *, world_size: int, pp: int, master_addr: str = "127.0.0.1", master_port: int = 0,
              threads: int = 1, extra_env: dict[str, str] | None = None, log_rank: int = 0) -> int:
    """Run `python -m vptrain.launch.worker run_dir` on world_size ranks; return the job's exit code."""
    port = master_port or free_port()
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    workers: list[Worker] = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({
            "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
        })
        log_path = os.path.join(logs, f"rank_{rank}.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vptrain.launch.worker", run_dir],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        w = Worker(rank, proc, log_path)
        w.pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, rank == log_rank), daemon=True)
        w.pump.start()
        workers.append(w)
    try:
        return _watch(workers, pp)
    except KeyboardInterrupt:
        print("\nvptrain: interrupted; stopping all ranks", file=sys.stderr)
        _stop_all(workers)
        return 130


def _watch(workers: list[Worker], pp: int) -> int:
    while True:
        codes = [(w, w.proc.poll()) for w in workers]
        failed = [(w, c) for w, c in codes if c not in (None, 0)]
        if failed:
            # When several ranks are down at once, the one killed by a signal (or the lowest rank
            # otherwise) is the likelier cause: its peers usually fail because it vanished.
            w, code = min(failed, key=lambda wc: (wc[1] > 0, wc[0].rank))
            if w.pump:
                w.pump.join(timeout=2)
            _stop_all(workers)
            stage, dp = w.rank % pp, w.rank // pp
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"\nvptrain: rank {w.rank} (stage {stage}, dp {dp}) {how}; stopped the other ranks.\n"
                  f"--- last lines of {w.log_path} ---\n{_tail(w.log_path)}", file=sys.stderr, flush=True)
            return code if code > 0 else 1
        if all(c == 0 for _, c in codes):
            for w in workers:
                if w.pump:
                    w.pump.join(timeout=5)
            return 0
        time.sleep(0.05)


def _stop_all(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGTERM)
    deadline = time.time() + GRACE_S
    for w in workers:
        while w.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait()
