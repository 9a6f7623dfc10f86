"""The cost model against published measurements: predicted vs measured MFU (and peak memory).

Every point of benchmarks/data/vp_published.csv (the VP repository's artifact results on 8 A100s and
the paper's v1 Tables 5-6 at 8-32 GPUs) is planned with `vptrain plan`'s make_plan on the paper's
setup (experiment=paper-<schedule>-<gpus>gpu, the point's V and sequence length, the artifact's redis
final-stage layer counts where it states them) and compared. Writes the "Cost-model calibration"
section of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/calibrate.py            # every point (~5 min on a quiet machine)
    .venv/bin/python benchmarks/calibrate.py --quick    # s=2048, V = 32k and 256k only
    .venv/bin/python benchmarks/calibrate.py --fit      # re-fit the A100 layer curve and overlap slowdown
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data" / "vp_published.csv"
PASS_TIMES = REPO / "benchmarks" / "data" / "vp_artifact_pass_times.csv"
HEADING = "## Cost-model calibration against published measurements"
# The artifact's redis runs (artifact/exp_one_host.csv, column layers_last): final-stage layers per V.
ARTIFACT_REDIS_LAST = {32000: 4, 64000: 3, 128000: 2, 256000: 0}
ERROR_BOUND_POINTS = {"vocab-1": 6.5, "vocab-2": 6.5, "vocab-naive": 6.5, "baseline": 8.0, "redis": 8.0,
                      "interlaced": 6.5}
"""Largest |predicted - measured| MFU, in points, the calibration admits per method on 1F1B (the
table records the actual errors; tests/unit/test_search.py holds the 8-GPU artifact points to it).
V-Half is not bounded: the paper's V-Half splits B and W, ours does not (a different schedule)."""


@dataclass(frozen=True)
class Point:
    source: str
    gpus: int
    schedule: str
    seq: int
    vocab: int
    method: str
    mfu: float
    """Measured, as a fraction."""
    peak_gb: float


def load_points(path: Path = DATA) -> list[Point]:
    with open(path) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [Point(r["source"], int(r["gpus"]), r["schedule"], int(r["seq"]), int(r["vocab"]), r["method"],
                      float(r["mfu_percent"]) / 100.0, float(r["peak_gb"])) for r in rows]


def experiment(pt: Point) -> str:
    return f"paper-{pt.schedule}-{pt.gpus}gpu"


def redis_layers(pt: Point) -> list[int] | None:
    """The artifact's redis split (8 GPUs, 32 layers): k on the last stage, the rest over the first
    7, later stages taking the remainder. Elsewhere None: our cost-balanced redis split."""
    if pt.method != "redis" or not pt.source.startswith("artifact") or pt.gpus != 8:
        return None
    from vptrain.layout import even_split

    k = ARTIFACT_REDIS_LAST[pt.vocab]
    return [*even_split(32 - k, 7), k]


def overrides(pt: Point) -> list[str]:
    """The command line that plans this point (`vptrain plan ...`)."""
    out = [f"experiment={experiment(pt)}", f"method={pt.method}", f"model.vocab_size={pt.vocab}",
           f"model.seq_len={pt.seq}"]
    split = redis_layers(pt)
    return out + ([f"layout.layers_per_stage=[{','.join(map(str, split))}]"] if split else [])


def configs(points: list[Point]) -> list:
    """Each point's config: its experiment composed once (composing is the slow part), then the
    point's method, V, sequence length and redis split set as overrides() would."""
    import copy

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vptrain.validate import validate

    bases, out = {}, []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for pt in points:
            if experiment(pt) not in bases:
                dcfg = compose("config", overrides=[f"experiment={experiment(pt)}"])
                dcfg.run_dir = "/tmp/vptrain-calibrate"
                bases[experiment(pt)] = OmegaConf.to_object(dcfg)
            cfg = copy.deepcopy(bases[experiment(pt)])
            cfg.method.name, cfg.model.vocab_size, cfg.model.seq_len = pt.method, pt.vocab, pt.seq
            cfg.layout.layers_per_stage = redis_layers(pt)
            validate(cfg)
            out.append(cfg)
    return out


def predict(cfg) -> tuple[float, float]:
    """(predicted MFU, predicted peak GiB of the fullest rank) of one point's config."""
    from vptrain.plan import make_plan

    plan = make_plan(cfg)
    return plan.mfu, max(s.memory_total for s in plan.stages) / 2**30


def errors_by(rows: list[dict], key: str) -> dict[str, tuple[float, float, int]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(abs(r["error"]))
    return {k: (sum(v) / len(v), max(v), len(v)) for k, v in out.items()}


def fit_layer_curve(points: list[Point]) -> tuple[float, float]:
    """Re-fit the A100 layer curve from the balanced vocab-1 1F1B points: each point's implied
    layer efficiency (the current one scaled by measured / predicted MFU) against its kernel work W,
    then 1/e = 1/ceiling + (half_work/ceiling) / W by least squares."""
    from vptrain.layout import model_shape
    from vptrain.schedule.costs import layer_flops
    from vptrain.schedule.efficiency import A100_BF16, KERNELS_PER_LAYER

    xs, ys = [], []
    chosen = [pt for pt in points if pt.method == "vocab-1" and pt.schedule == "1f1b"]
    for pt, cfg in zip(chosen, configs(chosen), strict=True):
        w = layer_flops(model_shape(cfg)) / KERNELS_PER_LAYER
        mfu, _ = predict(cfg)
        xs.append(1.0 / w)
        ys.append(1.0 / (A100_BF16.layer(w) * pt.mfu / mfu))
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    ceiling = 1.0 / (my - slope * mx)
    return ceiling, slope * ceiling


def fit_overlap_cost(path: Path = PASS_TIMES) -> tuple[float, float, float, float]:
    """The cost the overlapped methods' side-stream collectives add to their F and B, from the
    artifact's per-stage pass times: per run (V, s, vocab-1 or vocab-2), the mean over stages of its
    F + B per microbatch minus interlaced's (whose collectives block between passes) on the same
    stages and shapes, over the bytes each rank moves in those collectives per microbatch
    (costs.overlapped_collective_bytes). Returns (seconds per byte: mean, min, max over the runs;
    the mean slowdown as a fraction of F + B)."""
    from vptrain.schedule.costs import ModelShape, overlapped_collective_bytes

    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    busy = {}
    for r in rows:
        per_stage = [float(f) + float(b) for f, b in zip(r["f_us"].split(), r["b_us"].split(), strict=True)]
        busy[(r["method"], int(r["seq"]), int(r["vocab"]))] = 1e-6 * sum(per_stage) / len(per_stage)
    per_byte, fraction = [], []
    for (method, seq, vocab), t in busy.items():
        if method not in ("vocab-1", "vocab-2"):
            continue
        alone = busy[("interlaced", seq, vocab)]
        shape = ModelShape(vocab=vocab, vocab_rows=vocab, layers=32, hidden=3072, seq=seq, micro_batch=1,
                           act_bytes=2)  # the artifact's 8-GPU model, fp16
        per_byte.append((t - alone) / overlapped_collective_bytes(shape, method, 8))
        fraction.append(t / alone - 1.0)
    return sum(per_byte) / len(per_byte), min(per_byte), max(per_byte), sum(fraction) / len(fraction)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="s=2048 and V in {32k, 256k} only")
    ap.add_argument("--fit", action="store_true", help="print a re-fitted layer curve and exit")
    args = ap.parse_args(argv)
    from vptrain.config import register_configs

    register_configs()
    points = load_points()
    if args.quick:
        points = [p for p in points if p.seq == 2048 and p.vocab in (32000, 256000)]
    if args.fit:
        sub = [p for p in points if p.seq == 2048 and p.vocab == 128000]
        mean, low, high, fraction = fit_overlap_cost()
        print(f"overlap cost (vocab-1/2 F+B over interlaced's, artifact): {mean:.4g} s/byte (range {low:.3g}-"
              f"{high:.3g}; {100 * fraction:.1f}% of F+B on average)")
        ceiling, half = fit_layer_curve(sub)
        print(f"layer curve (uncontended) fitted on {len(sub)} vocab-1 points: ceiling={ceiling:.3f} "
              f"half_work={half:.3g}")
        return 0
    started = time.perf_counter()
    rows = []
    for pt, cfg in zip(points, configs(points), strict=True):
        mfu, gib = predict(cfg)
        rows.append({"pt": pt, "predicted": mfu, "error": 100 * (mfu - pt.mfu), "gib": gib,
                     "method": pt.method, "source": pt.source, "schedule": pt.schedule})
        print(f"{pt.source:<19} {pt.gpus:>2} GPUs {pt.schedule:<5} s={pt.seq} V={pt.vocab:<6} {pt.method:<11} "
              f"measured {100 * pt.mfu:5.1f}%  predicted {100 * mfu:5.1f}%  error {rows[-1]['error']:+5.1f}  "
              f"peak {pt.peak_gb:5.1f} GB vs {gib:5.1f} GiB", flush=True)
    elapsed = time.perf_counter() - started
    text = report(rows, elapsed, args.quick)
    if not args.quick:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from _report import write_section

        write_section(REPO / "docs" / "BENCHMARKS.md", HEADING, text)
    print(text)
    return 0


def report(rows: list[dict], elapsed: float, quick: bool) -> str:
    lines = [
        HEADING, "",
        "Predicted (`vptrain plan`'s cost model with the GEMM-shape efficiency of "
        "vptrain/schedule/efficiency.py, A100 profile, bf16) against published MFU: the VP artifact's "
        "example results (8 A100s, `artifact/example-results`) and the paper's v1 Tables 5 (1F1B) and 6 "
        "(V-Half) at 8-32 GPUs, as transcribed (benchmarks/data/vp_published.csv). Every point is the paper's "
        "setup: pure pipeline parallelism, 128 microbatches of 1, the point's V and sequence length. Error = "
        "predicted - measured, in MFU points. Reproduce "
        f"(≈ {elapsed / 60:.0f} min{', --quick subset' if quick else ''}): `.venv/bin/python benchmarks/calibrate.py`",
        "",
        "What it does not show: the fit and the check use the same published runs (no held-out cluster); the "
        "transformer curve rests on three model widths (h = 3072 / 4096 / 5120) and the vocabulary curve on one "
        "(8 GPUs, h = 3072); the paper ran fp16 where we predict bf16 at the same peak; our V-Half has no B/W "
        "split, the paper's does (its V-Half rows are a different schedule, expect them low); H100 has no "
        "published point (its curve is the A100's, scaled); nothing here is a measurement of vptrain itself. "
        "The two sources disagree where they overlap: at 8 GPUs, s = 4096 the artifact measures 57-59% for the "
        "vocabulary methods, the paper's table 50-51%; one set of constants cannot meet both (the fit sits "
        "near the artifact there, so the paper's points read +5).",
        "",
        "Against the flat efficiency (0.55 of peak) this replaces, on the paper's vocab-1 points at s = 2048, "
        "V = 128k: 8 / 16 / 32 GPUs +1.5 / -1.8 / -2.3 points before, +1.2 / -0.9 / -0.2 after (the flat "
        "constant ran low by more as pp grew); the schedules changed in between too (issue 10 §1-3), so this is "
        "not a clean A/B of the efficiency alone.",
        "",
        "Overlap cost: the artifact's per-stage pass times (benchmarks/data/vp_artifact_pass_times.csv, from "
        "`artifact/exp_one_host.csv`) show vocab-1's and vocab-2's transformer F + B 3.2% longer than interlaced's "
        "on the same stages and shapes (2.6-3.7% over 16 runs on one node, independent of V): their vocabulary "
        "collectives run on a side stream during F and B and take SMs and memory bandwidth from them, while "
        "interlaced's block between passes. The cost model charges the overlapped methods (vocab-naive, vocab-1, "
        "vocab-2) 1.87e-11 s of F and B per byte their collectives move per microbatch "
        "(DeviceProfile.overlap_s_per_byte; `--fit` re-derives it: 1.6-2.2e-11 over the runs), and the layer "
        "curve is the uncontended one (the earlier curve scaled by `--fit`'s ratio with / without the term). "
        "Per byte, not per pass: the same for a pipeline across nodes (no published per-pass time covers one; "
        "an assumption), smaller as a share where a stage holds more layers. The term alone (same schedules, "
        "every 1F1B point, mean / max |error| without -> with): interlaced 2.0 / 4.1 -> 2.0 / 6.4, vocab-1 "
        "1.7 / 5.5 -> 1.8 / 6.1, vocab-2 1.6 / 5.4 -> 1.7 / 5.9, baseline 2.4 / 6.9 -> 1.8 / 7.2, redis "
        "2.8 / 5.3 -> 2.5 / 5.2: it does not improve the fit on average; it changes the ordering at 8 GPUs "
        "(interlaced ahead, as measured; see the interlaced section). The maxima are the paper's 8-GPU "
        "s = 4096 points, where the paper reads 7-8 below the artifact. Interlaced's drop from the previous "
        "table (5.4 / 11.6) is its rebuilt schedule and the network tier (issue 10 §3), which that table "
        "predated.",
        "",
        "Error per method (mean / max |error|, points; the bound is calibrate.ERROR_BOUND_POINTS, which "
        "tests/unit/test_search.py holds the 8-GPU artifact points to):",
        "",
        "| schedule | method | points | mean abs | max abs | bound |",
        "|---|---|---|---|---|---|",
    ]
    for sched in ("1f1b", "vhalf"):
        sub = [r for r in rows if r["schedule"] == sched]
        for method, (mean, worst, n) in errors_by(sub, "method").items():
            bound = ERROR_BOUND_POINTS.get(method) if sched == "1f1b" else None
            lines.append(f"| {sched} | {method} | {n} | {mean:.1f} | {worst:.1f} | {bound or '-'} |")
    lines += ["", "Error per source:", "", "| source | points | mean abs | max abs |", "|---|---|---|---|"]
    for src, (mean, worst, n) in errors_by(rows, "source").items():
        lines.append(f"| {src} | {n} | {mean:.1f} | {worst:.1f} |")
    lines += ["", "Every point:", "",
              "| source | GPUs | schedule | seq | V | method | measured MFU | predicted | error | peak GB measured | "
              "predicted GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pt = r["pt"]
        lines.append(f"| {pt.source} | {pt.gpus} | {pt.schedule} | {pt.seq} | {pt.vocab} | {pt.method} | "
                     f"{100 * pt.mfu:.1f}% | {100 * r['predicted']:.1f}% | {r['error']:+.1f} | {pt.peak_gb:.1f} | "
                     f"{r['gib']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
