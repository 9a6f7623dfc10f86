"""`vptrain compare DIR`: the paper's comparison, from your own runs, offline.

Reads every run under DIR (a directory holding `summary.json` and `config.yaml`, as `vptrain
train` and `vptrain submit` leave them; a sweep directory holds one per point) and writes into DIR
(or --out):

    comparison.md              one row per run: throughput, MFU, per-stage peak memory, balance
    comparison.csv             the same, with one column per stage
    throughput_vs_vocab.png    tokens/s against vocabulary size, one line per method
    peak_memory_vs_vocab.png   per-stage peak memory against vocabulary size: the most loaded
                               stage (solid) and the least loaded (dashed), one colour per method
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vptrain.config import METHODS

MIB = 2**20
SKIP_DIRS = {"wandb", "checkpoints", ".submitit", ".hydra", "logs", "params"}
LABEL_KEYS = ("schedule", "pp", "dp", "model")


@dataclass
class Run:
    path: str
    method: str
    schedule: str
    pp: int
    dp: int
    model: str
    vocab_size: int
    steps_done: int
    steps_planned: int
    final_loss: float | None
    tokens_per_s: float | None
    tflops_per_device: float | None
    mfu: float | None
    iter_s: float | None
    stage_peaks: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.steps_done >= self.steps_planned

    @property
    def peak_max(self) -> int:
        return max(self.stage_peaks, default=0)

    @property
    def peak_min(self) -> int:
        return min(self.stage_peaks, default=0)


def _read_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}  # type: ignore[return-value]


def find_runs(root: Path) -> list[Run]:
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if "summary.json" not in filenames:
            continue
        run_dir = Path(dirpath)
        s = json.loads((run_dir / "summary.json").read_text())
        cfg = _read_config(run_dir)
        runs.append(Run(
            path=os.path.relpath(run_dir, root),
            method=s.get("method", "?"),
            schedule=s.get("schedule", "?"),
            pp=int(s.get("pp", 0)),
            dp=int(s.get("dp", 0)),
            model=cfg.get("model", {}).get("name", "?"),
            vocab_size=int(s.get("vocab_size", 0)),
            steps_done=int(s.get("steps", len(s.get("losses", [])))),
            steps_planned=int(cfg.get("train", {}).get("steps", s.get("steps", 0))),
            final_loss=s.get("final_loss"),
            tokens_per_s=s.get("tokens_per_s"),
            tflops_per_device=s.get("tflops_per_device"),
            mfu=s.get("mfu"),
            iter_s=s.get("median_iter_time_s"),
            stage_peaks=[int(st.get("peak_memory_bytes", 0)) for st in s.get("stages", [])],
        ))
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (order.get(r.method, len(order)), r.method, r.schedule, r.pp, r.dp, r.vocab_size, r.path))
    return runs


def series_label(run: Run, varying: tuple[str, ...]) -> str:
    extra = [f"{k}={getattr(run, k)}" for k in varying]
    return run.method + (f" ({', '.join(extra)})" if extra else "")


def varying_keys(runs: list[Run]) -> tuple[str, ...]:
    return tuple(k for k in LABEL_KEYS if len({getattr(r, k) for r in runs}) > 1)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(runs: list[Run]) -> str:
    head = ["run", "method", "schedule", "pp", "dp", "vocab", "steps", "final loss", "tokens/s", "TFLOP/s/dev",
            "MFU %", "ms/it", "peak MiB per stage", "max/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        peaks = " / ".join(f"{p / MIB:.1f}" for p in r.stage_peaks) or "-"
        ratio = f"{r.peak_max / r.peak_min:.2f}" if r.peak_min else "-"
        steps = f"{r.steps_done}/{r.steps_planned}" + ("" if r.complete else " (incomplete)")
        cells = [r.path, r.method, r.schedule, str(r.pp), str(r.dp), str(r.vocab_size), steps,
                 _fmt(r.final_loss, ".4f"), _fmt(r.tokens_per_s, ",.0f"), _fmt(r.tflops_per_device, ".3f"),
                 _fmt(None if r.mfu is None else 100 * r.mfu, ".2f"), _fmt(None if r.iter_s is None else
                                                                             1000 * r.iter_s, ".1f"), peaks, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(runs: list[Run], path: Path) -> None:
    stages = max((len(r.stage_peaks) for r in runs), default=0)
    fields = ["run", "method", "schedule", "pp", "dp", "model", "vocab_size", "steps_done", "steps_planned",
              "final_loss", "tokens_per_s", "tflops_per_device", "mfu", "median_iter_time_s", "peak_memory_max_bytes",
              "peak_memory_min_bytes"] + [f"stage_{i}_peak_memory_bytes" for i in range(stages)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in runs:
            w.writerow([r.path, r.method, r.schedule, r.pp, r.dp, r.model, r.vocab_size, r.steps_done,
                        r.steps_planned, r.final_loss, r.tokens_per_s, r.tflops_per_device, r.mfu, r.iter_s,
                        r.peak_max, r.peak_min] + r.stage_peaks + [""] * (stages - len(r.stage_peaks)))


def _series(runs: list[Run]) -> dict[str, list[Run]]:
    varying = varying_keys(runs)
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(series_label(r, varying), []).append(r)
    return out


def _points(runs: list[Run], value) -> tuple[list[int], list[float]]:
    """Mean per vocabulary size (repeated runs of one point are averaged)."""
    by_vocab: dict[int, list[float]] = {}
    for r in runs:
        v = value(r)
        if v is not None:
            by_vocab.setdefault(r.vocab_size, []).append(v)
    xs = sorted(by_vocab)
    return xs, [statistics.fmean(by_vocab[x]) for x in xs]


def plot(runs: list[Run], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = _series(runs)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in series.items():
        xs, ys = _points(rs, lambda r: r.tokens_per_s)
        ax.plot(xs, ys, marker="o", label=label)
    _axes(ax, "tokens/s (median step)", f"{title}: throughput")
    paths.append(_save(fig, out / "throughput_vs_vocab.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rs) in enumerate(series.items()):
        color = colors[i % len(colors)]
        xs, ys = _points(rs, lambda r: r.peak_max / MIB if r.stage_peaks else None)
        ax.plot(xs, ys, marker="o", color=color, label=f"{label}: most loaded stage")
        xs, ys = _points(rs, lambda r: r.peak_min / MIB if r.stage_peaks else None)
        ax.plot(xs, ys, marker="x", linestyle="--", color=color, label=f"{label}: least loaded stage")
    _axes(ax, "peak memory per stage (MiB)", f"{title}: per-stage peak memory")
    paths.append(_save(fig, out / "peak_memory_vs_vocab.png"))
    return paths


def _axes(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(root: Path, out: Path | None = None, title: str | None = None) -> list[Path]:
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs (summary.json) under {root}")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(runs)
    md = out / "comparison.md"
    md.write_text(f"# {title or root.name}\n\n{len(runs)} runs under `{root}`.\n\n{table}")
    write_csv(runs, out / "comparison.csv")
    return [md, out / "comparison.csv", *plot(runs, out, title or root.name)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vptrain compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="a sweep directory (or any directory holding runs)")
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
