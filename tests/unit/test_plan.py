"""`vptrain plan` end to end through the real CLI (a subprocess: the CLI calls sys.exit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli

from vptrain.plan import compare_table

# The paper's 8-GPU model (Table 1): 32 layers, 24 heads, h 3072, V = 256k, 128 microbatches.
PAPER_8GPU = ("model=gpt-4b", "layout.pp=8", "model.vocab_size=262144", "train.global_batch_size=128",
              "cluster=a100", "precision=bf16")


def _busy(plan: dict) -> list[float]:
    return [stage["busy_seconds"] for stage in plan["stages"]]


def test_baseline_last_stage_is_the_bottleneck(tmp_path: Path) -> None:
    proc = run_cli("plan", *PAPER_8GPU, "method=baseline", f"hydra.run.dir={tmp_path}", check=True, timeout=120)
    plan = json.loads((tmp_path / "plan.json").read_text())
    busy = _busy(plan)
    # 4 layers + an output layer worth V/(12h+2s) = 6.4 layers: about 2.5x the other stages.
    assert busy[-1] > 2.0 * max(busy[1:-1])
    assert max(busy[1:-1]) == pytest.approx(min(busy[1:-1]))
    for stage in plan["stages"]:
        assert {"layers", "vocab_rows", "parameters", "memory_bytes", "compute_flops"} <= stage.keys()
        assert {"params", "grads", "optimizer", "activations", "vocab_buffers", "total"} <= stage["memory_bytes"].keys()
    sched = plan["schedule"]
    assert {"bubble_rate", "peak_in_flight", "predicted_iteration_seconds", "mfu"} <= sched.keys()
    assert sched["peak_in_flight"] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert plan["stages"][-1]["vocab_rows"]["output"] == [0, 262144]
    assert (tmp_path / "schedule.png").stat().st_size > 10_000
    assert (tmp_path / "schedule.txt").read_text().startswith("# vptrain schedule")
    assert "\n# rank 0: stages 0\n" in (tmp_path / "schedule.txt").read_text()  # each rank's chunks, named
    out = proc.stdout
    assert "rank = dp_index * pp + pp_index" in out
    assert "rank 7 |" in out  # the schedule grid
    assert re.search(r"^PLAN method=baseline schedule=1f1b pp=8 .* bubble=", out, re.M)


def test_multirun_over_methods_balances_every_vocab_method(tmp_path: Path) -> None:
    methods = ["baseline", "redis", "vocab-naive", "vocab-1", "vocab-2", "interlaced"]
    proc = run_cli("plan", "-m", *PAPER_8GPU, f"method={','.join(methods)}", f"hydra.sweep.dir={tmp_path}",
                   check=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PLAN ")]
    assert [re.search(r"method=(\S+)", line).group(1) for line in lines] == methods
    plans = {m: json.loads((tmp_path / str(n) / "plan.json").read_text()) for n, m in enumerate(methods)}
    for method in ("vocab-naive", "vocab-1", "vocab-2", "interlaced"):
        busy = _busy(plans[method])
        assert max(busy) <= 1.05 * min(busy), method
        assert plans[method]["schedule"]["mfu"] > plans["baseline"]["schedule"]["mfu"]
    peaks = {m: plans[m]["schedule"]["peak_in_flight"][0] for m in methods}
    assert peaks == {"baseline": 8, "redis": 8, "vocab-naive": 10, "vocab-1": 10, "vocab-2": 9, "interlaced": 15}
    # redis takes layers off the last stage, so it beats the baseline's iteration time.
    iteration = {m: plans[m]["schedule"]["predicted_iteration_seconds"] for m in methods}
    assert iteration["redis"] < iteration["baseline"]
    table = compare_table([str(tmp_path)])
    assert len(table.splitlines()) == 1 + len(methods)
    assert "vocab-2" in table


def test_largest_paper_model_plans(tmp_path: Path) -> None:
    # How fast it plans is a benchmark's business (benchmarks/plan_paper.py), not a test's; the
    # subprocess timeout is only a hang guard.
    proc = run_cli("plan", "model=gpt-30b", "schedule=vhalf", "layout.pp=32", "train.global_batch_size=128",
                   "model.vocab_size=262144", "method=vocab-1", "cluster=a100", "precision=bf16",
                   f"hydra.run.dir={tmp_path}", check=True, timeout=600)
    assert re.search(r"^PLAN method=vocab-1 schedule=vhalf pp=32 ", proc.stdout, re.M)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["schedule"]["p"] == 32 and plan["schedule"]["m"] == 128
    peaks = plan["schedule"]["peak_in_flight"]
    assert max(peaks) - min(peaks) <= 1  # V-Half: balanced memory


def test_memory_over_the_device_warns(tmp_path: Path) -> None:
    proc = run_cli("plan", "model=gpt-4b", "layout.pp=2", "cluster=a100", "cluster.gpu_memory_gb=8",
                   f"hydra.run.dir={tmp_path}", check=True, timeout=120)
    assert "WARNING: pp rank 0 needs" in proc.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["warnings"]


def test_the_stage_table_reads_in_a_unit_that_shows_the_numbers() -> None:
    from conftest import validated_config

    from vptrain.plan import format_report, make_plan, memory_unit

    assert memory_unit(3 * 2**30) == ("GiB", 2**30) and memory_unit(2**30 - 1) == ("MiB", 2**20)
    assert memory_unit(5 * 2**10) == ("KiB", 2**10) and memory_unit(0.0) == ("B", 1.0)
    tiny = format_report(make_plan(validated_config()))  # gpt-tiny: a few MiB per stage
    assert "memory in MiB:" in tiny and "total MiB" in tiny
    table = tiny.split("total MiB", 1)[1].split("\n\n", 1)[0]
    totals = [float(row.split()[10]) for row in table.strip().splitlines()[1:]]
    assert totals and all(t >= 1.0 for t in totals), table  # not a column of 0.00
    big = format_report(make_plan(validated_config(**{"model.num_layers": 8, "model.hidden_size": 1024,
                                                      "model.num_heads": 8, "model.vocab_size": 262144})))
    assert "memory in GiB:" in big
