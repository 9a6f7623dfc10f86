"""The plain pipeline (DeepSpeed, gloo) equals the single-process reference, step by step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from _tolerances import ADAMW_EPS, RTOL, SGD_ATOL, SGD_LR, adamw_atol
from conftest import REPO, cli_env, load_params, train_run

from vptrain.config import OptimConfig

pytestmark = pytest.mark.distributed

COMMON = ("method=baseline", "train.steps=3", "logger=none", "train.dump_params=true", "train.global_batch_size=8")
SGD = ("optim=sgd", f"optim.lr={SGD_LR}")  # linear in the gradients: a strict comparison of the updates


def assert_same_run(run: dict, params: dict, ref: dict, ref_params: dict, *, rtol=RTOL, atol=SGD_ATOL) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0)
    assert sorted(params) == sorted(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}
    for layers in (4, 6):
        d = tmp_path_factory.mktemp(f"ref{layers}")
        runs[layers] = (train_run(d, "layout.pp=1", f"model.num_layers={layers}", *COMMON, *SGD), load_params(d))
    return runs


@pytest.mark.parametrize(
    "layout",
    [
        ("layout.pp=2",),
        ("layout.pp=2", "layout.dp=2"),
        ("layout.pp=3", "model.num_layers=6", "layout.layers_per_stage=[1,3,2]"),
    ],
    ids=["pp2", "pp2-dp2", "pp3-uneven"],
)
def test_pipeline_equals_single_process(tmp_path, reference, layout):
    layers = 6 if "model.num_layers=6" in layout else 4
    run = train_run(tmp_path, *layout, f"model.num_layers={layers}", *COMMON, *SGD)
    ref, ref_params = reference[layers]
    assert_same_run(run, load_params(tmp_path), ref, ref_params)
    assert ref["losses"][2] < ref["losses"][0]  # the steps actually trained


def test_adamw_and_clipping_match_the_reference(tmp_path):
    # AdamW's 1/(sqrt(v) + eps) amplifies summation-order differences of near-zero gradients by up
    # to lr/eps: the tolerance and the eps of this comparison are derived in _tolerances.py.
    adamw = ("optim=adamw", f"optim.eps={ADAMW_EPS}", "train.grad_clip=0.5")
    ref = train_run(tmp_path / "ref", "layout.pp=1", *COMMON, *adamw)
    run = train_run(tmp_path / "pp", "layout.pp=2", "layout.dp=2", *COMMON, *adamw)
    atol = adamw_atol(OptimConfig(eps=ADAMW_EPS), steps=3)
    assert_same_run(run, load_params(tmp_path / "pp"), ref, load_params(tmp_path / "ref"), atol=atol)


def test_bf16_pipeline_tracks_fp32(tmp_path):
    ref = train_run(tmp_path / "ref", "layout.pp=1", *COMMON, *SGD)
    run = train_run(tmp_path / "bf16", "layout.pp=2", "precision=bf16", *COMMON, *SGD)
    # bf16 activations/weights with fp32 master weights: losses agree to bf16 resolution.
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-2, atol=0)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_entry_point_equals_local_launch(tmp_path):
    local = train_run(tmp_path / "local", "layout.pp=2", *COMMON, *SGD)
    run_dir = tmp_path / "torchrun"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--rdzv-endpoint=127.0.0.1:0",
         "--rdzv-backend=c10d", "-m", "vptrain.cli", "train", f"hydra.run.dir={run_dir}", "layout.pp=2", *COMMON, *SGD],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["losses"] == local["losses"]


def test_a_killed_rank_ends_the_job_with_the_rank_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, "layout.pp=2", "logger=none", "train.collective_timeout_s=30")
    os.kill(worker_pid(run_dir, rank=1), signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)  # a hang guard, not a speed limit
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 1" in err and "signal 9" in err


# Fault tests wait for a job to end on its own. How long that takes depends on the machine's load,
# so the bound is only there to fail a job that never ends instead of hanging the suite.
HANG_GUARD_S = 600


def start_long_run(run_dir, *overrides: str) -> subprocess.Popen:
    """Start a run that would train for ages; return once it has logged two steps."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vptrain.cli", "train", f"hydra.run.dir={run_dir}", *overrides, "train.steps=100000"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    return proc


def worker_pid(run_dir, rank: int) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"vptrain.launch.worker" in cmd and str(run_dir).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker process for rank {rank}")
