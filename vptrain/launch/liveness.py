"""Ranks that die with their launcher, and a heartbeat per rank that tells a stuck rank from its
waiting peers.

Lifeline. The local launcher starts each worker in its own session (so a signal meant for one
rank's process group reaches nothing else), which also means nothing ends the workers when the
launcher dies. Two mechanisms, either one enough:
- the parent-death signal (Linux prctl): the kernel SIGKILLs the worker when the launcher exits.
  It fires when the *thread* that forked the worker exits, so the launcher asks for it only when it
  forks from its main thread, which lives as long as the process;
- a pipe: the launcher holds the write end, every worker a read end; the read returns EOF once the
  launcher is gone however it went (any POSIX system, any thread). The worker then kills its
  process group.

Heartbeat. Every rank rewrites logs/rank_<r>.alive with the time, from a thread, every few
seconds. A rank that is stopped (SIGSTOP), or hung holding the interpreter, stops beating; its
peers keep beating while they wait for it in a collective. When a rank fails with a timeout, the
stale heartbeat (and, on this machine, the process state) names the rank that did not arrive.
Files, not the rendezvous store: the store lives in rank 0, which may be the stuck one, and
close-to-open consistency makes a freshly opened file current on NFS as well.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

LAUNCHER_FD_ENV = "VPTRAIN_LAUNCHER_FD"
"""Set by the local launcher: the read end of its lifeline pipe, in the worker."""
LAUNCHER_PID_ENV = "VPTRAIN_LAUNCHER_PID"
"""Set by the local launcher when it forked from its main thread: ask for the parent-death signal."""
PR_SET_PDEATHSIG = 1


def heartbeat_interval(collective_timeout_s: float) -> float:
    """A tenth of the collective timeout, between 0.5 s and 5 s: a stuck rank is then many beats
    behind when its peer's collective times out, and a large job's beats stay rare on a shared
    filesystem."""
    return min(5.0, max(0.5, collective_timeout_s / 10))


def stale_after(collective_timeout_s: float) -> float:
    """A rank silent this long is not merely busy. A peer times out only after waiting
    collective_timeout_s for it, so by then its heartbeat is at least that old; a healthy rank's is
    one interval old. Half the timeout lies between the two, with room for a loaded machine."""
    return max(3 * heartbeat_interval(collective_timeout_s), collective_timeout_s / 2)


def heartbeat_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "logs", f"rank_{rank}.alive")


@dataclass
class Heartbeat:
    path: str
    interval_s: float
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, run_dir: str, rank: int, collective_timeout_s: float) -> Heartbeat:
        os.makedirs(os.path.dirname(heartbeat_path(run_dir, rank)), exist_ok=True)
        beat = cls(heartbeat_path(run_dir, rank), heartbeat_interval(collective_timeout_s))
        beat._write()
        threading.Thread(target=beat._run, name="vptrain-heartbeat", daemon=True).start()
        return beat

    def _write(self) -> None:
        try:
            # Overwritten in place with a fixed width (never truncated, so never seen empty), and
            # closed each time rather than kept open: close-to-open makes it visible on NFS.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.pwrite(fd, f"{time.time():017.3f}\n".encode(), 0)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full or vanished disk must not end the rank; the beat only names suspects

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def stop(self) -> None:
        self._stop.set()


def heartbeat_age(run_dir: str, rank: int, now: float | None = None) -> float | None:
    """Seconds since the rank's last beat; None when it never beat."""
    try:
        with open(heartbeat_path(run_dir, rank)) as f:
            text = f.read()
            try:
                beat = float(text)
            except ValueError:
                # Created but not yet written (a rank stopped right there stays so): the creation is
                # as recent as a beat. fstat of the opened file is current on NFS too.
                beat = os.fstat(f.fileno()).st_mtime
    except OSError:
        return None
    return max(0.0, (time.time() if now is None else now) - beat)


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T = stopped, t = traced, Z, ...); None off Linux
    or when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def unresponsive(run_dir: str, ranks: dict[int, int | None], collective_timeout_s: float) -> list[tuple[int, str]]:
    """(rank, why) for each of `ranks` (rank -> local pid or None) that is stopped or whose heartbeat
    is stale, most likely culprit first: a stopped process, then the longest silence."""
    now, limit = time.time(), stale_after(collective_timeout_s)
    found: list[tuple[int, float, str]] = []
    for rank, pid in ranks.items():
        state = process_state(pid) if pid is not None else None
        age = heartbeat_age(run_dir, rank, now)
        reasons = []
        if state in ("T", "t"):
            reasons.append("its process is stopped (state T)")
        if age is not None and age > limit:
            reasons.append(f"no heartbeat for {age:.0f} s")
        if reasons:
            found.append((rank, (1e9 if state in ("T", "t") else 0) + (age or 0), "; ".join(reasons)))
    return [(rank, why) for rank, _, why in sorted(found, key=lambda f: -f[1])]


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) exits. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def hold_lifeline(run_dir: str, rank: int, environ: dict[str, str] | None = None) -> bool:
    """In a worker of the local launcher: end this process (and its group) when the launcher is gone.
    Returns False when this process was not started by the local launcher (torchrun, srun)."""
    env = os.environ if environ is None else environ
    if LAUNCHER_FD_ENV not in env:
        return False
    if LAUNCHER_PID_ENV in env:
        parent = int(env[LAUNCHER_PID_ENV])
        if set_parent_death_signal() and os.getppid() != parent:
            _die(run_dir, rank, parent)  # it died before the signal was armed
    fd, launcher = int(env[LAUNCHER_FD_ENV]), os.getppid()
    threading.Thread(target=_watch_pipe, args=(fd, run_dir, rank, launcher), name="vptrain-lifeline",
                     daemon=True).start()
    return True


def _watch_pipe(fd: int, run_dir: str, rank: int, launcher: int) -> None:
    while True:
        try:
            if os.read(fd, 1) == b"":
                break  # EOF: every write end is closed, so the launcher has exited
        except InterruptedError:
            continue
        except OSError:
            return  # not a pipe we can watch: rely on the parent-death signal
    _die(run_dir, rank, launcher)


def _die(run_dir: str, rank: int, launcher: int) -> None:
    # The console was the launcher's pipe, now closed: leave the reason in the rank's log.
    try:
        with open(os.path.join(run_dir, "logs", f"rank_{rank}.log"), "a") as log:
            log.write(f"vptrain: rank {rank}: the launcher (pid {launcher}) is gone; ending this rank\n")
    except OSError:
        pass
    if os.getpgrp() == os.getpid():  # a session leader, as the launcher starts it: take its children too
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
