"""Start pp * dp worker processes on this machine and watch them.

Each rank's output goes to run_dir/logs/rank_<r>.log; the logging rank's output is also shown on
the console. When any rank exits non-zero the others are stopped at once (a dead rank must never
leave its peers hanging in a collective) and the failing rank is named with the tail of its log;
when it failed because a peer stopped answering, the peer is named (vptrain/launch/liveness.py).

The workers die with the launcher (parent-death signal and a lifeline pipe), and the launcher's
SIGINT/SIGTERM stops them cleanly: they are asked, with SIGUSR2 (vptrain/preempt.py), to agree on
a step to stop after and write a checkpoint there; a second signal stops them at once.
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
from dataclasses import dataclass, field

from vptrain.console import PROGRESS_ENV, ProgressBar, console_line, parse_marker
from vptrain.launch.liveness import LAUNCHER_FD_ENV, LAUNCHER_PID_ENV, unresponsive

GRACE_S = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ASK_RANKS_TO_STOP = signal.SIGUSR2  # always caught by the ranks' Preemption handler


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


class _StopNow(Exception):
    """A second stop signal: end the ranks without waiting for their step."""


@dataclass
class StopOnSignal:
    """The launcher's SIGINT/SIGTERM handler (main thread only, where Python runs handlers)."""

    workers: list[Worker]
    received: signal.Signals | None = None
    previous: dict[int, object] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        if self.received is not None:
            self.uninstall()  # a third signal acts as it would without vptrain
            raise _StopNow(signum)
        self.received = signal.Signals(signum)
        print(f"\nvptrain: got {self.received.name}; every rank stops after its current step and writes a "
              f"checkpoint (send {self.received.name} again to stop at once)", file=sys.stderr, flush=True)
        for w in self.workers:
            if w.proc.poll() is None:
                _signal_rank(w, ASK_RANKS_TO_STOP)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or signal.SIGTERM)


def stopped_on_request(code: int) -> bool:
    """Whether run_local's exit code means the ranks were stopped by the launcher's SIGINT/SIGTERM."""
    return code in {128 + int(s) for s in STOP_SIGNALS}


def _pump(stream, log_path: str, echo: bool, bar: ProgressBar | None) -> None:
    """A rank's output into its log; the logging rank's also to the console (vptrain/console.py),
    its progress markers into the bar."""
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace").rstrip("\r\n")
            progress = parse_marker(text) if echo else None
            if progress is not None:
                if bar is not None:
                    bar.update(*progress)
                continue
            log.write(line)
            log.flush()
            if echo:
                bar.line(text) if bar is not None else console_line(text)


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


def run_local(run_dir: str, *, world_size: int, pp: int, master_addr: str = "127.0.0.1", master_port: int = 0,
              threads: int = 1, extra_env: dict[str, str] | None = None, log_rank: int = 0,
              collective_timeout_s: float = 300.0, inherit_fds: tuple[int, ...] = ()) -> int:
    """Run `python -m vptrain.launch.worker run_dir` on world_size ranks; return the job's exit code.

    inherit_fds stay open in every worker: the run-directory lock, held until the last rank exits."""
    port = master_port or free_port()
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    workers: list[Worker] = []
    bar = ProgressBar() if sys.stdout.isatty() else None  # a log file or a pipe gets the lines only
    stop = StopOnSignal(workers)
    stop.install()
    # Only this process holds the write end (os.pipe is close-on-exec; the workers get the read end).
    lifeline_r, lifeline_w = os.pipe()
    try:
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(extra_env or {})
            env.update({
                "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", LAUNCHER_FD_ENV: str(lifeline_r),
            })
            if bar is not None and rank == log_rank:
                env[PROGRESS_ENV] = "1"
            if threading.current_thread() is threading.main_thread():
                env[LAUNCHER_PID_ENV] = str(os.getpid())  # the parent-death signal follows the forking thread
            log_path = os.path.join(logs, f"rank_{rank}.log")
            proc = subprocess.Popen(
                [sys.executable, "-m", "vptrain.launch.worker", run_dir],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=(lifeline_r, *inherit_fds),
            )
            w = Worker(rank, proc, log_path)
            w.pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, rank == log_rank, bar), daemon=True)
            w.pump.start()
            workers.append(w)
            if stop.received is not None:  # asked to stop while starting: ask this one too
                _signal_rank(w, ASK_RANKS_TO_STOP)
        os.close(lifeline_r)
        lifeline_r = -1
        return _watch(workers, pp, run_dir, collective_timeout_s, stop, bar)
    except _StopNow:
        print(f"vptrain: got {stop.received.name} again; stopping all ranks now", file=sys.stderr, flush=True)
        _stop_all(workers)
        return stop.exit_code
    finally:
        stop.uninstall()
        _stop_all(workers)  # nothing is left running, whatever happened above
        if bar is not None:
            bar.close()
        for fd in (lifeline_r, lifeline_w):
            if fd >= 0:
                os.close(fd)


def describe_rank(rank: int, pp: int) -> str:
    return f"rank {rank} (stage {rank % pp}, dp {rank // pp})"


def _watch(workers: list[Worker], pp: int, run_dir: str, collective_timeout_s: float, stop: StopOnSignal,
           bar: ProgressBar | None = None) -> int:
    while True:
        codes = [(w, w.proc.poll()) for w in workers]
        failed = [(w, c) for w, c in codes if c not in (None, 0)]
        if failed:
            # When several ranks are down at once, the one killed by a signal (or the lowest rank
            # otherwise) is the likelier cause: its peers usually fail because it vanished.
            w, code = min(failed, key=lambda wc: (wc[1] > 0, wc[0].rank))
            # A rank that exited on its own may have timed out waiting for a peer that is alive but
            # not answering: look for one before the others are stopped.
            alive = {o.rank: o.proc.pid for o, c in codes if c is None}
            suspects = unresponsive(run_dir, alive, collective_timeout_s) if code > 0 else []
            if w.pump:
                w.pump.join(timeout=2)
            _stop_all(workers)
            if bar is not None:  # the message starts on a line of its own
                bar.close()
            print(_failure_message(w, code, pp, suspects, stop), file=sys.stderr, flush=True)
            if stop.received is not None:
                return stop.exit_code
            return code if code > 0 else 1
        if all(c == 0 for _, c in codes):
            for w in workers:
                if w.pump:
                    w.pump.join(timeout=5)
            if bar is not None:
                bar.close()
            if stop.received is not None:
                print(f"vptrain: stopped on {stop.received.name}: every rank finished its step and exited; "
                      "continue with train.resume=auto", file=sys.stderr, flush=True)
                return stop.exit_code
            return 0
        time.sleep(0.05)


def _failure_message(w: Worker, code: int, pp: int, suspects: list[tuple[int, str]], stop: StopOnSignal) -> str:
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    tail = f"--- last lines of {w.log_path} ---\n{_tail(w.log_path)}"
    if stop.received is not None and code == -int(ASK_RANKS_TO_STOP):
        return (f"\nvptrain: stopped on {stop.received.name} while {describe_rank(w.rank, pp)} was still starting "
                "(it ended at once); stopped the other ranks, no checkpoint written.")
    if suspects:
        rank, why = suspects[0]
        return (f"\nvptrain: {describe_rank(rank, pp)} stopped responding ({why}); {describe_rank(w.rank, pp)} "
                f"then {how}, most likely a collective timing out while waiting for it; stopped the other ranks.\n"
                f"{tail}")
    return f"\nvptrain: {describe_rank(w.rank, pp)} {how}; stopped the other ranks.\n{tail}"


def _stop_all(workers: list[Worker]) -> None:
    running = [w for w in workers if w.proc.poll() is None]
    for w in running:
        _signal_group(w, signal.SIGTERM)
        _signal_group(w, signal.SIGCONT)  # a stopped rank acts on SIGTERM only once resumed
    deadline = time.time() + GRACE_S
    for w in running:
        while w.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if w.proc.poll() is None:
            _signal_group(w, signal.SIGKILL)
            w.proc.wait()


def _signal_rank(w: Worker, sig: signal.Signals) -> None:
    try:
        os.kill(w.proc.pid, sig)  # the rank only: its helper processes (W&B's) do not handle SIGUSR2
    except ProcessLookupError:
        pass


def _signal_group(w: Worker, sig: signal.Signals) -> None:
    try:
        os.killpg(w.proc.pid, sig)  # the worker leads its own session: this reaches its children too
    except ProcessLookupError:
        pass  # exited since it was polled
