"""One job per run directory (vptrain/run_lock.py): real flock locks, held by real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from vptrain import run_lock
from vptrain.run_lock import LOCK_FILE, RunDirInUse, acquire, ensure_free

HOLD = """
import sys, time
from vptrain.run_lock import acquire
lock = acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run, as a running job's launcher does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_job_is_refused_naming_the_holder_and_the_directory(tmp_path, holder):
    with pytest.raises(RunDirInUse) as err:
        acquire(str(tmp_path / "run"), environ={})
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "run") in message
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert message.startswith("hydra.run.dir: "), "the CLI prints it as a config error naming the key"


def test_the_lock_is_released_when_its_holder_dies_however_it_dies(tmp_path, holder):
    holder.kill()  # SIGKILL: no cleanup ran; the file (naming a dead pid) stays behind
    holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()
    with acquire(str(tmp_path / "run"), environ={}) as lock:
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and lock.fd is not None


def test_release_lets_the_next_job_in(tmp_path):
    run_dir = str(tmp_path / "run")
    acquire(run_dir, environ={}).release()
    with acquire(run_dir, environ={}) as lock:
        assert lock.fd is not None


def test_a_lock_is_shared_only_with_the_process_and_descriptor_it_names(tmp_path):
    run_dir = str(tmp_path / "run")
    with acquire(run_dir, environ={}):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        for other in ({"pid": record["pid"] + 1}, {"host": "elsewhere"}, {"fd": 0}):
            (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({**record, **other}))
            with pytest.raises(RunDirInUse):
                acquire(run_dir, environ={})


def test_the_process_holding_the_lock_shares_it(tmp_path):
    """The CLI locks before Hydra writes .hydra/; the launcher in the same process then shares it,
    and the directory stays locked while either descriptor is open."""
    run_dir = str(tmp_path / "run")
    early = acquire(run_dir, environ={})
    shared = acquire(run_dir, environ={})
    assert shared.fd is not None and shared.fd != early.fd
    early.release()
    with pytest.raises(RunDirInUse):
        ensure_free(run_dir)  # ensure_free opens the file anew: refused while `shared` holds it
    shared.release()
    ensure_free(run_dir)


@pytest.mark.parametrize(("mine", "allowed"), [
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, True),  # the requeue of the holder's job
    ({"SLURM_JOB_ID": "77"}, False),  # the same attempt again: two jobs in one allocation
    ({"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "3"}, False),  # another job
    ({}, False),
])
def test_only_a_requeue_of_the_same_slurm_job_passes_a_held_lock(tmp_path, mine, allowed):
    run_dir = str(tmp_path / "run")
    held = acquire(run_dir, environ={"SLURM_JOB_ID": "77"})
    # As seen from another process of that job's next attempt (on NFS, a dead node's lock can
    # outlive it until its lease runs out).
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({**record, "pid": 1, "host": "node-that-died"}))
    try:
        if allowed:
            lock = acquire(run_dir, environ=mine)
            assert lock.fd is None, "continues without claiming the lock it could not take"
        else:
            with pytest.raises(RunDirInUse, match="Slurm job 77 attempt 1"):
                acquire(run_dir, environ=mine)
    finally:
        held.release()


def test_a_run_directory_that_is_a_file_is_a_config_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="hydra.run.dir: .* is a file"):
        acquire(str(tmp_path / "f"))


def test_holder_record_names_the_slurm_attempt():
    holder = run_lock.this_holder(3, {"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"})
    assert holder.slurm_job_id == "12" and holder.restart == 2
    assert "Slurm job 12 attempt 3" in holder.describe()
    assert time.strftime("%Y-%m-%d", time.gmtime()) in holder.describe()
