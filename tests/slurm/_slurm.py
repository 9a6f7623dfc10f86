"""Helpers for the Slurm tests: submit, and wait on jobs with bounded waits that fail with the job's
state and log tail. The cluster itself comes from the `slurm_cluster` fixture in tests/conftest.py."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli


def log_tail(run_dir: Path, lines: int = 40) -> str:
    logs = sorted(run_dir.glob("slurm-*.out"))
    if not logs:
        return f"(no slurm-*.out in {run_dir})"
    text = logs[-1].read_text(errors="replace").splitlines()
    return f"--- last lines of {logs[-1]} ---\n" + "\n".join(text[-lines:])


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) from squeue; ("", "") once Slurm no longer lists the job as queued or running."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, timeout=20)
    parts = out.stdout.split(None, 1) if out.returncode == 0 else []
    return (parts[0], parts[1].strip()) if parts else ("", "")


def final_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=20)
    m = re.search(r"JobState=(\w+)", out.stdout)
    return m.group(1) if m else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, run_dir: Path, job_id: str, poll: float = 0.2):
    """Poll until predicate() is truthy; fail with the job's state and log tail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (job {job_id}: {job_state(job_id)}, "
                f"{final_state(job_id)})\n{log_tail(run_dir)}")


def wait_done(job_id: str, run_dir: Path, timeout: float = 120) -> None:
    """Wait for the job to leave the queue, then require it COMPLETED."""
    wait_for(lambda: job_state(job_id) == ("", ""), timeout, "the job to finish", run_dir, job_id)
    state = final_state(job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{log_tail(run_dir)}"


def submit(*overrides: str, env: dict[str, str] | None = None) -> list[str]:
    """`vptrain submit ...`; returns the job ids it printed."""
    proc = run_cli("submit", *overrides, env=env, timeout=120, check=True)
    ids = re.findall(r"submitted job (\d+)", proc.stdout)
    assert ids, f"no job id in the output of vptrain submit:\n{proc.stdout}\n{proc.stderr}"
    return ids


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def release_requeued(job_id: str, run_dir: Path, timeout: float = 60) -> None:
    """Slurm holds a requeued job for about two minutes (Reason=BeginTime) before it may start again.
    The test lets it start early, which changes nothing else; but not within the same second as the
    requeue, or slurmd still treats the new attempt's credential as revoked and the job fails."""
    wait_for(lambda: job_state(job_id) == ("PENDING", "BeginTime"), timeout, "the requeued job to be pending",
             run_dir, job_id, poll=0.1)
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=20)
