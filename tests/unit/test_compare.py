"""`vptrain compare`: table, CSV and plots from run directories (summaries written here by hand,
no training; their configs composed as the CLI composes them) and from a real `vptrain plan -m` sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import run_cli
from test_config import compose_cfg

from vptrain.compare import main, overlapping
from vptrain.compare_plots import series_name
from vptrain.compare_runs import balance, find_runs, points, varying_overrides
from vptrain.config import to_yaml

MIB = 2**20
PNG = b"\x89PNG"


def fake_run(path: Path, *overrides: str, tps: float, peaks: list[int], busy: list[float], steps: int = 4,
             losses: list[float] | None = None) -> None:
    """A run directory as `vptrain train` leaves it: config.yaml (with the overrides that made it)
    and summary.json (the figures given)."""
    cfg = compose_cfg(*overrides, "logger=none", f"train.steps={steps}")
    cfg.overrides = [*overrides, "logger=none", f"hydra.run.dir={path}"]
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    losses = losses or [5.0 - 0.1 * i for i in range(steps)]
    stages = [{"stage": i, "params": 1000, "peak_memory_bytes": p, "memory_bytes": {"peak": p}, "busy_s_median": b,
               "busy_s_last_step": b} for i, (p, b) in enumerate(zip(peaks, busy, strict=True))]
    summary = {"method": cfg.method.name, "schedule": cfg.schedule.name, "pp": cfg.layout.pp, "dp": cfg.layout.dp,
               "vocab_size": cfg.model.vocab_size, "steps": len(losses), "losses": losses, "final_loss": losses[-1],
               "median_iter_time_s": 0.05, "tokens_per_s": tps, "tflops_per_device": 0.01, "mfu": 0.1,
               "stages": stages}
    (path / "summary.json").write_text(json.dumps(summary))


def sweep(root: Path) -> Path:
    """method x vocabulary, the baseline at 512 twice more (seeds): a sweep with repeats."""
    fake_run(root / "0", "method=baseline", "model.vocab_size=512", tps=1000, peaks=[30 * MIB, 10 * MIB],
             busy=[0.03, 0.01])
    fake_run(root / "1", "method=baseline", "model.vocab_size=512", "train.seed=1", tps=900,
             peaks=[30 * MIB, 10 * MIB], busy=[0.04, 0.01])
    fake_run(root / "2", "method=baseline", "model.vocab_size=512", "train.seed=2", tps=1200,
             peaks=[30 * MIB, 10 * MIB], busy=[0.05, 0.01])
    fake_run(root / "3", "method=baseline", "model.vocab_size=1024", tps=600, peaks=[90 * MIB, 10 * MIB],
             busy=[0.06, 0.02])
    fake_run(root / "4", "method=vocab-1", "model.vocab_size=512", tps=1100, peaks=[20 * MIB, 20 * MIB],
             busy=[0.02, 0.02])
    fake_run(root / "5", "method=vocab-1", "model.vocab_size=1024", tps=1000, peaks=[50 * MIB, 40 * MIB],
             busy=[0.03, 0.02], steps=4, losses=[5.0, 4.9])  # stopped after 2 of 4 steps
    (root / "0" / "wandb").mkdir()  # ignored
    return root


def _rows(table: str) -> dict[str, list[str]]:
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| point"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def test_points_are_named_by_what_varies_and_repeats_are_one_point(tmp_path):
    runs = find_runs(sweep(tmp_path / "sweep"))
    assert varying_overrides(runs) == ["method", "model.vocab_size", "train.seed"]
    pts = points(runs)
    assert [p.name for p in pts] == ["method=baseline,model.vocab_size=512", "method=baseline,model.vocab_size=1024",
                                     "method=vocab-1,model.vocab_size=512", "method=vocab-1,model.vocab_size=1024"]
    base = pts[0]
    assert len(base.runs) == 3 and base.spread("tokens_per_s").median == 1000
    assert (base.spread("tokens_per_s").low, base.spread("tokens_per_s").high) == (900, 1200)
    assert base.stage_busy == [0.04, 0.01] and balance(base.stage_busy) == 4.0
    assert series_name(pts[0]) == series_name(pts[1]) == "method=baseline"
    # Every measured run carries the plan's busy time for its own config: stage 1 holds the output
    # layer in the baseline, the vocabulary method spreads it.
    assert balance(pts[0].plan_busy) > balance(pts[2].plan_busy) >= 1.0


def test_compare_writes_table_csv_and_plots(tmp_path):
    root = sweep(tmp_path / "sweep")
    assert main([str(root)]) == 0
    table = (root / "comparison.md").read_text()
    rows = _rows(table)
    base = rows["method=baseline,model.vocab_size=512"]
    assert base[1:8] == ["measured", "baseline", "1f1b", "2", "1", "512", "3"]
    assert base[10] == "1,000 (900-1,200)"  # median and range of the repeats
    assert base[14:16] == ["40.0 / 10.0", "4.00"] and base[17:19] == ["30.0 / 10.0", "3.00"]
    assert rows["method=vocab-1,model.vocab_size=1024"][8] == "2/4 (incomplete)"
    assert float(base[16]) > float(rows["method=vocab-1,model.vocab_size=512"][16])  # the plan's balance
    with open(root / "comparison.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 and csv_rows[0]["stage_1_busy_s"] == "0.01"
    assert {r["point"] for r in csv_rows} == set(rows)
    for png in ("throughput_vs_vocab.png", "peak_memory_vs_vocab.png", "busy_per_stage.png", "loss_vs_step.png"):
        assert (root / png).read_bytes()[:4] == PNG, png


def test_overlapping_ranges_are_named_not_ranked(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root / "a", "method=baseline", "train.seed=1", tps=1000, peaks=[1, 1], busy=[0.02, 0.01])
    fake_run(root / "b", "method=baseline", "train.seed=2", tps=1300, peaks=[1, 1], busy=[0.02, 0.01])
    fake_run(root / "c", "method=vocab-1", "train.seed=1", tps=1200, peaks=[1, 1], busy=[0.01, 0.01])
    fake_run(root / "d", "method=vocab-1", "train.seed=2", tps=1250, peaks=[1, 1], busy=[0.01, 0.01])
    pts = points(find_runs(root))
    assert overlapping(pts) == [("method=baseline", "method=vocab-1")]
    assert main([str(root)]) == 0
    note = "within noise (tokens/s ranges overlap): method=baseline ~ method=vocab-1"
    assert note in (root / "comparison.md").read_text()


def test_compare_reads_a_plan_sweep(tmp_path):
    """`vptrain plan -m` writes plan.json per point: compare tables and plots the predictions."""
    root = tmp_path / "plans"
    run_cli("plan", "-m", f"hydra.sweep.dir={root}", "layout.pp=2", "method=baseline,vocab-1",
            "model.vocab_size=512,2048", timeout=300, check=True)
    runs = find_runs(root)
    assert len(runs) == 4 and {r.kind for r in runs} == {"planned"}
    proc = run_cli("compare", str(root), timeout=300, check=True)
    rows = _rows((root / "comparison.md").read_text())
    assert set(rows) == {f"method={m},model.vocab_size={v}" for m in ("baseline", "vocab-1") for v in (512, 2048)}
    by_name = {f"method={r.method},model.vocab_size={r.vocab_size}": r for r in runs}
    for name, cells in rows.items():
        plan = json.loads((root / by_name[name].path / "plan.json").read_text())
        assert cells[1] == "planned" and cells[12] == f"{1000 * plan['schedule']['predicted_iteration_seconds']:.1f}"
    # The baseline's last stage carries the output layer: its imbalance grows with the vocabulary.
    big, small = rows["method=baseline,model.vocab_size=2048"], rows["method=baseline,model.vocab_size=512"]
    assert float(big[15]) > float(small[15])
    assert "wrote" in proc.stdout and (root / "busy_per_stage.png").read_bytes()[:4] == PNG


def test_out_dir_and_empty_dir(tmp_path):
    root = sweep(tmp_path / "sweep")
    proc = run_cli("compare", str(root), "--out", str(tmp_path / "report"), timeout=300, check=True)
    assert (tmp_path / "report" / "comparison.md").exists() and "wrote" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("compare", str(empty), timeout=120)
    assert proc.returncode == 2 and "no runs" in proc.stderr and not proc.stderr.startswith("Traceback")


def test_a_run_of_another_schema_is_compared_without_its_plan(tmp_path, capsys):
    root = tmp_path / "sweep"
    fake_run(root / "old", "method=baseline", tps=1000, peaks=[2, 1], busy=[0.02, 0.01])
    with open(root / "old" / "config.yaml", "a") as f:
        f.write("a_key_this_version_does_not_have: 1\n")
    [run] = find_runs(root)
    assert run.tokens_per_s == 1000 and run.stage_busy == [0.02, 0.01] and run.plan_busy == []
    assert "config.yaml does not load" in capsys.readouterr().err
