"""One job per run directory: an exclusive lock on run_dir/vptrain.lock.

The lock is `flock`, so the kernel drops it when the last process holding it exits, however it
exits (crash, SIGKILL, node reboot): a lock file left behind is never stale by itself. The file
only says who holds it (pid, host, Slurm job and attempt), for the error a second job prints.

Who holds it: the process that starts the job. `vptrain train` on one machine: the launcher, which
hands the descriptor to its workers so the directory stays locked until the last rank is gone.
Under torchrun/srun, where each rank is started by someone else: global rank 0 only (every rank
locking the same file on a shared filesystem would refuse its own peers). A requeued attempt of a
Slurm job (same SLURM_JOB_ID, higher SLURM_RESTART_COUNT) may continue when the previous attempt's
lock is still seen, as on NFS while the dead node's lease runs out.

The file is never deleted: unlinking a lock file lets two jobs lock two different inodes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

LOCK_FILE = "vptrain.lock"
# flock on a filesystem that cannot lock (some Lustre/NFS mounts): say so and run unguarded.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(ValueError):
    """Another job holds the run directory (a ValueError: the CLI prints it as one line, exit 2)."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    slurm_job_id: str | None
    restart: int
    started: float
    fd: int = -1
    """The descriptor in the holder's process (lets the same process reuse its own lock)."""

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id} attempt {self.restart + 1}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}{job}, since {since}"


def this_holder(fd: int, environ: dict[str, str] | None = None) -> Holder:
    env = os.environ if environ is None else environ
    return Holder(pid=os.getpid(), host=socket.gethostname(), slurm_job_id=env.get("SLURM_JOB_ID") or None,
                  restart=int(env.get("SLURM_RESTART_COUNT") or 0), started=time.time(), fd=fd)


def read_holder(path: str) -> Holder | None:
    try:
        with open(path) as f:
            return Holder(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None  # not written yet (the holder is between lock and write) or not ours


@dataclass
class RunLock:
    run_dir: str
    fd: int | None
    """None when running without the lock (a Slurm requeue, or a filesystem that cannot lock)."""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()  # a lock whose owner is gone (the CLI's, after an in-process run) is released

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def acquire(run_dir: str, environ: dict[str, str] | None = None) -> RunLock:
    """Lock run_dir for this job or raise RunDirInUse naming the holder. Creates the directory."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"hydra.run.dir: {run_dir} is a file, not a directory; choose another hydra.run.dir")
    os.makedirs(run_dir, exist_ok=True)
    path = lock_path(run_dir)
    # No O_TRUNC: the holder's record must survive until we know we hold the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _when_held(run_dir, path, read_holder(path), environ)
    except OSError as err:
        os.close(fd)
        if err.errno not in _UNSUPPORTED:
            raise
        print(f"vptrain: warning: cannot lock {path} ({os.strerror(err.errno)}): this filesystem does not "
              "support flock, so a second job on this run directory would not be refused", file=sys.stderr)
        return RunLock(run_dir, None)
    record = json.dumps(asdict(this_holder(fd, environ))).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return RunLock(run_dir, fd)


def _when_held(run_dir: str, path: str, holder: Holder | None, environ: dict[str, str] | None) -> RunLock:
    me = this_holder(-1, environ)
    if holder is not None and holder.pid == me.pid and holder.host == me.host and _same_file(holder.fd, path):
        # This process locked it already (the CLI does, before Hydra writes .hydra/): share that lock.
        return RunLock(run_dir, os.dup(holder.fd))
    requeue = holder is not None and holder.slurm_job_id == me.slurm_job_id and holder.restart < me.restart
    if requeue and me.slurm_job_id:
        print(f"vptrain: {path} is still held by attempt {holder.restart + 1} of this Slurm job "
              f"({holder.describe()}); continuing as its requeue (attempt {me.restart + 1})", flush=True)
        return RunLock(run_dir, None)
    who = holder.describe() if holder is not None else f"holder unknown: {path} is locked but names no process"
    raise RunDirInUse(f"hydra.run.dir: {run_dir} is in use by another vptrain job ({who}); wait for it to end, "
                      "stop it, or choose another hydra.run.dir")


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def ensure_free(run_dir: str) -> None:
    """Raise RunDirInUse if a job holds run_dir now (for `vptrain submit`, which writes config.yaml
    long before its job starts and takes the lock)."""
    if os.path.isdir(run_dir) and os.path.exists(lock_path(run_dir)):
        acquire(run_dir).release()

