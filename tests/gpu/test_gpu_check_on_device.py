"""The one-GPU check (benchmarks/gpu_check.py) passes: S+T at >= 80% of the GEMM rate, training
steps without per-microbatch host syncs, NCCL and every vocabulary collective. Needs a CUDA GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_check_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = cli_env()
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), "--no-docs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    failed = [c for c in json.loads(out.read_text())["checks"] if c["ok"] is False]
    assert proc.returncode == 0 and not failed, proc.stdout + "\n" + json.dumps(failed, indent=1)
