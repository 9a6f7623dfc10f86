"""benchmarks/gpu_check.py's code paths, run on CPU (--cpu: small shapes, gloo), and its clean exit
without a GPU. The real check is tests/gpu/test_gpu_check.py."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env

from vptrain.vocab import ALGOS


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=600)


def test_cpu_dry_run_runs_every_check_and_reports_it(tmp_path, monkeypatch):
    docs = (REPO / "docs" / "BENCHMARKS.md").read_text()
    out = tmp_path / "gpu_check.json"
    proc = _gpu_check("--cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = {c["name"]: c for c in result["checks"]}
    assert result["passed"] and result["device"] == "cpu"
    # (a) ran both pipelined algorithms against the GEMMs; on CPU the rate is measured, not judged.
    for algo in ("alg1", "alg2"):
        row = checks[f"(a) S+T {algo}, bf16"]
        assert row["ok"] is None and row["detail"]["fraction_of_gemm"] > 0
    # (b) trained with the real trainer: finite losses, one per checked step.
    steps = checks["(b) pp=1 bf16 steps, host syncs"]["detail"]["losses"]
    assert len(steps) == 2 and all(abs(v) < 100 for v in steps)
    # (c) every collective and every algorithm's phases, judged (correctness holds on any backend).
    for name in ("gloo init + first collective", "broadcast x [N,h] bf16", "all_reduce sum ∇X [N,h] fp32",
                 "all_reduce max [N] fp32", "reduce [N,h] fp32 to rank 0", "all_gather stats [3,N] fp32",
                 *(f"phases {a}" for a in ALGOS), "embed_reduce + grad_broadcast"):
        assert checks[f"(c) {name}"]["ok"] is True, checks[f"(c) {name}"]
    assert "| (c) phases alg2" in proc.stdout  # the table
    assert (REPO / "docs" / "BENCHMARKS.md").read_text() == docs, "a CPU dry run must not write figures into the docs"
    # What a GPU run writes into docs/BENCHMARKS.md, from the same JSON.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    section = gpu_check.docs_section(result)
    assert section.startswith(gpu_check.HEADING + "\n")
    assert len([line for line in section.splitlines() if line.startswith("| (")]) == len(checks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _gpu_check("--out", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "no CUDA device is available; nothing was checked" in proc.stderr
    assert not out.exists()
