"""`vptrain compare DIR`: the paper's comparison, from your own runs and plans, offline.

Reads every run under DIR (a directory holding `summary.json`, as `vptrain train` and `vptrain
submit` leave them, or `plan.json`, as `vptrain plan` does; a sweep directory holds one per point),
names each by the overrides that vary between them, gathers repeats (runs that differ only in
train.seed) into one point, and writes into DIR (or --out):

    comparison.md              one row per point: throughput (median and range of the repeats), MFU,
                               per-stage busy time and its max/min balance beside the plan's, per-stage
                               peak memory and its max/min
    comparison.csv             one row per run, one column per stage
    throughput_vs_vocab.png    tokens/s against vocabulary size, one line per series, repeats' range as bars
    peak_memory_vs_vocab.png   per-stage peak memory against vocabulary size: the most loaded stage
                               (solid) and the least loaded (dashed)
    busy_per_stage.png         busy time per stage, bars per point: the balance the methods are about
    loss_vs_step.png           training loss per step (median of the repeats), measured runs only
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from vptrain.compare_plots import MIB, plot
from vptrain.compare_runs import Point, Run, Spread, balance, find_runs, points, run_name, varying_overrides


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(s: Spread | None, spec: str, scale: float = 1.0) -> str:
    if s is None:
        return "-"
    if s.n == 1 or s.low == s.high:
        return format(s.median * scale, spec)
    return f"{s.median * scale:{spec}} ({s.low * scale:{spec}}-{s.high * scale:{spec}})"


def _per_stage(values: list[float], spec: str, scale: float) -> str:
    return " / ".join(format(v * scale, spec) for v in values) or "-"


def _ratio(values: list[float]) -> str:
    return _fmt(balance(values), ".2f")


HEAD = ["point", "kind", "method", "schedule", "pp", "dp", "vocab", "runs", "steps", "final loss",
        "tokens/s", "MFU %", "ms/it", "ms/it (plan)", "busy ms per stage", "busy max/min",
        "busy max/min (plan)", "peak MiB per stage", "peak max/min"]


def markdown(pts: list[Point]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for pt in pts:
        r = pt.first
        if r.kind == "planned":
            steps, loss = "-", "-"
        else:
            done = min(x.steps_done for x in pt.runs)
            steps = f"{done}/{r.steps_planned}" + ("" if all(x.complete for x in pt.runs) else " (incomplete)")
            loss = _spread(Spread.of([x.losses[-1] if x.losses else None for x in pt.runs]), ".4f")
        cells = [pt.name, r.kind, r.method, r.schedule, str(r.pp), str(r.dp), str(r.vocab_size), str(len(pt.runs)),
                 steps, loss, _spread(pt.spread("tokens_per_s"), ",.0f"), _spread(pt.spread("mfu"), ".2f", 100),
                 _spread(pt.spread("iter_s"), ".1f", 1000), _spread(pt.spread("plan_iter_s"), ".1f", 1000),
                 _per_stage(pt.stage_busy, ".1f", 1000), _ratio(pt.stage_busy), _ratio(pt.plan_busy),
                 _per_stage(pt.stage_peaks, ".1f", 1 / MIB), _ratio(pt.stage_peaks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = """\
- tokens/s, MFU, ms/it: the median over a run's steps after the first; with repeats, the median of the
  repeats and their range (low-high). Where two points' ranges overlap, their order is not established.
- busy: a stage's compute time per step (median over steps); max/min 1.00 is a balanced pipeline.
  "(plan)": the cost model's figure for the same config (cluster.profile); on a CPU only ratios compare.
- peak memory: measured (CUDA peak, or on CPU parameters + gradients + optimizer state), or the plan's
  total for plan.json points.
"""


def overlapping(pts: list[Point]) -> list[tuple[str, str]]:
    """Measured points of the same series whose tokens/s ranges overlap (the ranking is within noise)."""
    out = []
    measured = [p for p in pts if p.first.kind == "measured" and p.spread("tokens_per_s")]
    for i, a in enumerate(measured):
        for b in measured[i + 1:]:
            sa, sb = a.spread("tokens_per_s"), b.spread("tokens_per_s")
            if (a.first.vocab_size == b.first.vocab_size and sa and sb and max(sa.n, sb.n) > 1
                    and sa.low <= sb.high and sb.low <= sa.high):
                out.append((a.name, b.name))
    return out


def write_csv(runs: list[Run], path: Path) -> None:
    stages = max((len(r.stage_peaks) for r in runs), default=0)
    varying = varying_overrides(runs)
    fields = (["point", "run", "kind", "method", "schedule", "pp", "dp", "model", "vocab_size", "steps_done",
               "steps_planned", "final_loss", "tokens_per_s", "mfu", "median_iter_time_s", "plan_iteration_s",
               "busy_max_over_min", "plan_busy_max_over_min", "peak_memory_max_over_min"]
              + [f"stage_{i}_busy_s" for i in range(stages)] + [f"stage_{i}_plan_busy_s" for i in range(stages)]
              + [f"stage_{i}_peak_memory_bytes" for i in range(stages)])

    def pad(values: list[float]) -> list:
        return list(values) + [""] * (stages - len(values))

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in runs:
            w.writerow([run_name(r, varying), r.path, r.kind, r.method, r.schedule, r.pp, r.dp, r.model,
                        r.vocab_size, r.steps_done, r.steps_planned, r.losses[-1] if r.losses else "",
                        r.tokens_per_s, r.mfu, r.iter_s, r.plan_iter_s, balance(r.stage_busy), balance(r.plan_busy),
                        balance(r.stage_peaks)] + pad(r.stage_busy) + pad(r.plan_busy) + pad(r.stage_peaks))


def compare(root: Path, out: Path | None = None, title: str | None = None) -> list[Path]:
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs (summary.json) or plans (plan.json) under {root}")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    pts = points(runs)
    notes = NOTES
    close = overlapping(pts)
    if close:
        notes += "- within noise (tokens/s ranges overlap): " + "; ".join(f"{a} ~ {b}" for a, b in close) + "\n"
    md = out / "comparison.md"
    md.write_text(f"# {title or root.name}\n\n{len(runs)} runs, {len(pts)} points under `{root}`.\n\n"
                  f"{markdown(pts)}\n{notes}")
    write_csv(runs, out / "comparison.csv")
    return [md, out / "comparison.csv", *plot(pts, out, title or root.name)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vptrain compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="a sweep directory (or any directory holding runs or plans)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the table and plots (default: DIR)")
    ap.add_argument("--title", default=None, help="plot title (default: the directory name)")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        print(f"vptrain compare: {args.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        written = compare(args.dir.resolve(), args.out, args.title)
    except FileNotFoundError as err:
        print(f"vptrain compare: {err}", file=sys.stderr)
        return 2
    print(written[0].read_text())
    for p in written:
        print(f"wrote {p}")
    return 0
