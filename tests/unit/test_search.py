"""`vptrain plan --search` (vptrain/search.py) and the calibrated GEMM-shape efficiency
(vptrain/schedule/efficiency.py, benchmarks/calibrate.py). Simulated, never timed."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vptrain.config import register_configs
from vptrain.plan import make_plan
from vptrain.schedule import PassKind
from vptrain.schedule.costs import ModelShape, device_profile, layer_flops, pass_costs
from vptrain.schedule.efficiency import gemm_efficiency
from vptrain.search import check_search

REPO = Path(__file__).resolve().parents[2]
GIB = float(1 << 30)
# V = 256k on a narrow 8-layer model: a whole vocabulary table (262144 x 256 x 18 bytes of weights,
# gradients and AdamW state = 1.1 GiB) cannot fit a 1 GiB device, a quarter of each table can.
SMALL = ("model.num_layers=8", "model.hidden_size=256", "model.num_heads=4", "model.seq_len=256",
         "model.vocab_size=262144", "cluster=a100", "precision=bf16", "train.global_batch_size=16")
BUDGET = ("search.gpus=4", "search.memory_gib=1")


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides))
    dcfg.run_dir = "/tmp/vptrain-test-search"
    return OmegaConf.to_object(dcfg)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[list[dict], list[dict], str]:
    out = tmp_path_factory.mktemp("search")
    proc = run_cli("plan", "--search", *SMALL, *BUDGET, f"hydra.run.dir={out}", check=True, timeout=240)
    entries = json.loads((out / "search.json").read_text())
    every = json.loads((out / "search_candidates.json").read_text())
    return entries, every, proc.stdout


def test_search_json_is_sorted_complete_and_within_budget(searched) -> None:
    entries, every, out = searched
    assert len(entries) >= 5
    times = [e["predicted_iteration_seconds"] for e in entries]
    assert times == sorted(times)
    for e in entries:
        assert {"method", "schedule", "pp", "dp", "predicted_iteration_seconds", "mfu", "peak_memory_bytes",
                "bubble", "pipeline_seconds", "dp_sync_seconds", "overrides"} <= e.keys()
        assert e["pp"] * e["dp"] == 4
        assert 0 < e["peak_memory_bytes"] <= 1 * GIB
        assert 0 < e["mfu"] < 1
    # Every method x schedule x (pp, dp) was considered; the top rows are printed.
    assert {(c["pp"], c["dp"]) for c in every} == {(1, 4), (2, 2), (4, 1)}
    assert {c["method"] for c in every} == {"baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2"}
    assert out.count("\n1  ") == 1 and "why the other methods lose:" in out


def test_a_budget_too_small_for_the_whole_table_excludes_baseline_and_redis(searched) -> None:
    entries, every, out = searched
    assert not {e["method"] for e in entries} & {"baseline", "redis"}
    assert all(c["status"] == "out_of_memory" for c in every if c["method"] in ("baseline", "redis"))
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "out of memory" in lines["baseline"] and "out of memory" in lines["redis"]


def test_the_best_entry_is_make_plans_prediction(searched) -> None:
    entries, _, _ = searched
    best = entries[0]
    plan = make_plan(_cfg(*SMALL, *best["overrides"]))
    assert best["pipeline_seconds"] == plan.iteration_s
    assert best["predicted_iteration_seconds"] == plan.iteration_s + best["dp_sync_seconds"]
    assert best["peak_memory_bytes"] == max(s.memory_total for s in plan.stages)
    assert best["bubble"] == plan.sim.bubble_rate
    if best["dp"] == 1:
        assert best["dp_sync_seconds"] == 0 and best["mfu"] == plan.mfu


@pytest.fixture(scope="module")
def small_cfg():
    return _cfg(*SMALL)


@pytest.mark.parametrize(("key", "value"), [
    ("gpus", 9),  # pp <= 8 layers and dp | 16 leave no 9 = pp x dp
    ("gpus", 0),
    ("memory_gib", 0.0),
    ("memory_gib", -4.0),
    ("methods", ["vocab-3"]),
    ("schedules", []),
    ("top", 0),
    ("margin", -0.1),
])
def test_bad_search_values_name_the_key(small_cfg, key: str, value) -> None:
    cfg = copy.deepcopy(small_cfg)
    setattr(cfg.search, key, value)
    with pytest.raises(ValueError, match=rf"^search\.{key}: "):
        check_search(cfg)


def test_bad_search_value_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("plan", "--search", *SMALL, "search.memory_gib=0", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "search.memory_gib" in err[0]
    assert not (tmp_path / "search.json").exists()


def test_gemm_efficiency_is_monotone_and_bounded() -> None:
    for device in ("a100", "h100"):
        curves = gemm_efficiency(device)
        for curve in (curves.layer, curves.vocab):
            works = [10.0 ** e for e in range(6, 15)]
            effs = [curve(w) for w in works]
            assert all(0 < a < b for a, b in zip(effs, effs[1:], strict=False))
            assert effs[-1] < curve.ceiling <= 1.0
    assert gemm_efficiency("cpu") is None and gemm_efficiency("a100", "fp32") is None


def test_wider_layers_and_larger_shards_run_closer_to_peak() -> None:
    a100 = device_profile("a100")

    def seconds_per_flop(h: int, rows: int) -> tuple[float, float]:
        """(forward of a 2-layer chunk, S of a `rows`-row shard), in seconds per FLOP."""
        m = ModelShape(vocab=rows * 4, vocab_rows=rows * 4, layers=8, hidden=h, seq=2048, micro_batch=1, act_bytes=2)
        c = pass_costs(m, method="vocab-1", p=4, chunk_layers=[(2,)] * 4, loss_place=(3, 0), precision="bf16",
                       device=a100)
        forward = (c.compute[0][(PassKind.F, 0)] - a100.pass_overhead_s) / (2 * layer_flops(m) / 3)
        s_pass = (c.compute[0][(PassKind.S, 0)] - a100.pass_overhead_s) / (2 * m.tokens * h * rows)
        return forward, s_pass

    narrow, small = seconds_per_flop(3072, 4000)
    wide, large = seconds_per_flop(5120, 32000)
    assert wide < narrow and large < small


def test_cpu_profile_keeps_its_flat_efficiency() -> None:
    cpu = device_profile("cpu")
    m = ModelShape(vocab=512, vocab_rows=512, layers=4, hidden=64, seq=64, micro_batch=1, act_bytes=4)
    c = pass_costs(m, method="baseline", p=2, chunk_layers=[(2,), (2,)], loss_place=(1, 0), precision="fp32",
                   device=cpu)
    forward = 2 * layer_flops(m) / 3
    assert c.compute[0][(PassKind.F, 0)] == pytest.approx(forward / (cpu.peak_flops["fp32"] * cpu.efficiency)
                                                          + cpu.pass_overhead_s, rel=1e-3)


def test_calibration_error_stays_within_the_recorded_bound(monkeypatch) -> None:
    """The artifact's 8-GPU points at V = 256k, s = 2048 (the largest imbalance the artifact measures):
    baseline (last stage 10 layer-units against 4), redis (the artifact's final-stage count) and the
    default method, each within the bound docs/BENCHMARKS.md records for its method."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import calibrate

    register_configs()
    points = [p for p in calibrate.load_points() if p.source == "artifact-full-exp" and p.seq == 2048
              and p.vocab == 256000 and p.method in ("baseline", "redis", "vocab-2")]
    assert len(points) == 3
    for pt, cfg in zip(points, calibrate.configs(points), strict=True):
        mfu, _ = calibrate.predict(cfg)
        assert abs(100 * (mfu - pt.mfu)) <= calibrate.ERROR_BOUND_POINTS[pt.method], (pt, mfu)
    sys.modules.pop("calibrate", None)
