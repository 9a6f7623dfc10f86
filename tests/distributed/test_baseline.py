"""The plain pipeline (DeepSpeed, gloo) equals the single-process reference, step by step.

The layouts, AdamW with clipping and bf16 train in the session's group of spawned CPU processes
(_matrix_group.py: a launch costs ~10 s here, a case there ~1 s); the CLI runs hold the whole path
(launcher, torchrun, the dumped parameters) to the same reference.
"""

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
from _matrix_group import Matrix, run_matrix
from _tolerances import ADAMW_EPS, RTOL, SGD_ATOL, SGD_LR, adamw_atol
from conftest import ON_CPU, REPO, cli_env, load_params, train_run

from vptrain.config import OptimConfig

pytestmark = pytest.mark.distributed

COMMON = (ON_CPU, "method=baseline", "train.steps=3", "logger=none", "train.dump_params=true",
          "train.global_batch_size=8")
SGD = ("optim=sgd", f"optim.lr={SGD_LR}")  # linear in the gradients: a strict comparison of the updates
PP2_DP2 = ("layout.pp=2", "layout.dp=2")


def assert_same_run(run: dict, params: dict, ref: dict, ref_params: dict, *, rtol=RTOL, atol=SGD_ATOL) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0)
    assert sorted(params) == sorted(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# The jobs of COMMON + SGD for _engine_matrix.py, which starts from the schema's defaults: those
# are model=gpt-tiny's and optim=adamw's, so ADAMW only sets what the CLI job overrides.
MATRIX_SGD = {"method.name": "baseline", "train.steps": 3, "train.global_batch_size": 8, "optim.name": "sgd",
              "optim.lr": SGD_LR, "optim.min_lr": SGD_LR, "optim.warmup_steps": 0, "optim.decay": "constant"}
ADAMW = {"optim.name": "adamw", "optim.lr": 1e-2, "optim.min_lr": 1e-3, "optim.warmup_steps": 5,
         "optim.decay": "cosine", "optim.eps": ADAMW_EPS, "train.grad_clip": 0.5}
LAYOUTS = {
    "pp2": {"layout.pp": 2},
    # 4 layers split unlike the default [1,1,2]
    "pp3-uneven": {"layout.pp": 3, "layout.layers_per_stage": [2, 1, 1]},
}
CASES = [
    *[{"name": name, "overrides": {**MATRIX_SGD, **layout}} for name, layout in LAYOUTS.items()],
    {"name": "adamw-clip-pp2-dp2", "overrides": {**MATRIX_SGD, "layout.pp": 2, "layout.dp": 2, **ADAMW}},
    {"name": "bf16-pp2", "overrides": {**MATRIX_SGD, "layout.pp": 2, "precision": "bf16"}},
]
MATRIX = Matrix("equivalence", CASES, timeout_s=300)


@pytest.fixture(scope="module")
def matrix(request):
    return run_matrix(request, MATRIX)


def _case(matrix, name: str) -> tuple[dict, dict]:
    case_dir = matrix.clean(name)
    return torch.load(case_dir / "result.pt"), torch.load(case_dir / "reference.pt")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_equals_single_process(matrix, layout):
    run, ref = _case(matrix, layout)
    assert_same_run(run, run["params"], ref, ref["params"])
    assert ref["losses"][2] < ref["losses"][0]  # the steps actually trained


def test_adamw_and_clipping_match_the_reference(matrix):
    # AdamW's 1/(sqrt(v) + eps) amplifies summation-order differences of near-zero gradients by up
    # to lr/eps: the tolerance and the eps of this comparison are derived in _tolerances.py.
    run, ref = _case(matrix, "adamw-clip-pp2-dp2")
    atol = adamw_atol(OptimConfig(eps=ADAMW_EPS), steps=3)
    assert_same_run(run, run["params"], ref, ref["params"], atol=atol)
    # The norm each step clipped with (fp64, summed over the stages) is the reference's.
    torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=RTOL, atol=0)


def test_bf16_pipeline_tracks_fp32(matrix):
    run, _ = _case(matrix, "bf16-pp2")
    _, fp32_ref = _case(matrix, "pp2")
    # bf16 activations/weights with fp32 master weights: losses agree to bf16 resolution.
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(fp32_ref["losses"]), rtol=1e-2, atol=0)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """sgd_run(*layout): (summary, params) of the CLI job COMMON + SGD on that layout, trained once
    per module (the single-process reference, and the run the torchrun entry point is compared with)."""
    runs: dict[tuple[str, ...], tuple[dict, dict]] = {}

    def run(*layout: str) -> tuple[dict, dict]:
        if layout not in runs:
            d = tmp_path_factory.mktemp("sgd")
            runs[layout] = (train_run(d, *layout, *COMMON, *SGD), load_params(d))
        return runs[layout]

    return run


def test_the_launched_job_equals_single_process(sgd_run):
    """End to end through `vptrain train` (launcher, data-parallel ranks, train.dump_params)."""
    run, params = sgd_run(*PP2_DP2)
    ref, ref_params = sgd_run("layout.pp=1")
    assert_same_run(run, params, ref, ref_params)
    assert ref["losses"][2] < ref["losses"][0]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_entry_point_equals_local_launch(tmp_path, sgd_run):
    local, _ = sgd_run(*PP2_DP2)
    run_dir = tmp_path / "torchrun"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=4", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-backend=c10d", "-m", "vptrain.cli",
         "train", f"hydra.run.dir={run_dir}", *PP2_DP2, *COMMON, *SGD],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["losses"] == local["losses"]


def test_a_killed_rank_ends_the_job_with_the_rank_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, ON_CPU, "layout.pp=2", "logger=none", "train.collective_timeout_s=30")
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
