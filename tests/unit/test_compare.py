"""`vptrain compare`: table, CSV and plots from run directories (written here by hand, no training)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

from vptrain.compare import find_runs, main, series_label, varying_keys

MIB = 2**20


def fake_run(path: Path, *, method: str, vocab: int, tps: float, peaks: list[int], pp: int = 2, steps: int = 10,
             planned: int = 10) -> None:
    path.mkdir(parents=True)
    stages = [{"stage": i, "params": 1000, "peak_memory_bytes": p, "memory_bytes": {"peak": p}, "busy_s_last_step": 0.1}
              for i, p in enumerate(peaks)]
    summary = {"method": method, "schedule": "1f1b", "pp": pp, "dp": 1, "vocab_size": vocab, "steps": steps,
               "losses": [5.0] * steps, "final_loss": 5.0, "median_iter_time_s": 0.05, "tokens_per_s": tps,
               "tflops_per_device": 0.01, "mfu": 0.1, "stages": stages}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text(f"model:\n  name: gpt-tiny\n  vocab_size: {vocab}\ntrain:\n  steps: {planned}\n")


def sweep(root: Path) -> Path:
    fake_run(root / "0", method="baseline", vocab=32768, tps=1000, peaks=[30 * MIB, 10 * MIB])
    fake_run(root / "1", method="baseline", vocab=262144, tps=600, peaks=[90 * MIB, 10 * MIB])
    fake_run(root / "2", method="vocab-1", vocab=32768, tps=1100, peaks=[20 * MIB, 20 * MIB])
    fake_run(root / "3", method="vocab-1", vocab=262144, tps=1000, peaks=[50 * MIB, 50 * MIB], steps=4)
    (root / "0" / "wandb").mkdir()  # ignored
    return root


def test_compare_writes_table_csv_and_plots(tmp_path):
    root = sweep(tmp_path / "sweep")
    assert main([str(root)]) == 0
    table = (root / "comparison.md").read_text()
    assert "| 0 | baseline | 1f1b | 2 | 1 | 32768 | 10/10 |" in table
    assert "| 3 | vocab-1 | 1f1b | 2 | 1 | 262144 | 4/10 (incomplete) |" in table
    assert "| 90.0 / 10.0 | 9.00 |" in table  # per-stage peaks and the max/min imbalance
    rows = (root / "comparison.csv").read_text().splitlines()
    assert rows[0].endswith("stage_0_peak_memory_bytes,stage_1_peak_memory_bytes") and len(rows) == 5
    for png in ("throughput_vs_vocab.png", "peak_memory_vs_vocab.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"


def test_out_dir_and_empty_dir(tmp_path):
    root = sweep(tmp_path / "sweep")
    proc = run_cli("compare", str(root), "--out", str(tmp_path / "report"), timeout=120, check=True)
    assert (tmp_path / "report" / "comparison.md").exists() and "wrote" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("compare", str(empty), timeout=120)
    assert proc.returncode == 2 and "no runs" in proc.stderr


def test_methods_in_paper_order_and_labels_show_what_varies(tmp_path):
    fake_run(tmp_path / "a", method="vocab-2", vocab=1024, tps=1, peaks=[1, 1], pp=4)
    fake_run(tmp_path / "b", method="baseline", vocab=1024, tps=1, peaks=[1, 1], pp=2)
    runs = find_runs(tmp_path)
    assert [r.method for r in runs] == ["baseline", "vocab-2"]
    assert varying_keys(runs) == ("pp",)
    assert series_label(runs[1], ("pp",)) == "vocab-2 (pp=4)"
