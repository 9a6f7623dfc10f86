"""The plots of `vptrain compare` (vptrain/compare.py): files only, no display."""

from __future__ import annotations

from pathlib import Path

from vptrain.compare_runs import Point, balance

MIB = 2**20
VOCAB_KEY = "model.vocab_size="


def series_name(pt: Point) -> str:
    """A point's line in the against-vocabulary plots: its name less the vocabulary size."""
    parts = [x for x in pt.name.split(",") if not x.startswith(VOCAB_KEY)]
    name = ",".join(parts) or pt.first.method
    return name + (" (plan)" if pt.first.kind == "planned" else "")


def _series(pts: list[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for pt in pts:
        out.setdefault(series_name(pt), []).append(pt)
    for members in out.values():
        members.sort(key=lambda p: p.first.vocab_size)
    return out


def plot(pts: list[Point], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = _series(pts)
    vocabs = sorted({pt.first.vocab_size for pt in pts})
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, members) in enumerate(series.items()):
        xs, ys, lo, hi = [], [], [], []
        for pt in members:
            s = pt.spread("tokens_per_s")
            if s is not None:
                xs.append(pt.first.vocab_size)
                ys.append(s.median)
                lo.append(s.median - s.low)
                hi.append(s.high - s.median)
        style = "--" if label.endswith("(plan)") else "-"
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", linestyle=style, capsize=3, color=colors[i % len(colors)],
                    label=label)
    _vocab_axes(ax, "tokens/s (median step; bars: range of repeats)", f"{title}: throughput", vocabs)
    paths.append(_save(fig, out / "throughput_vs_vocab.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, members) in enumerate(series.items()):
        color = colors[i % len(colors)]
        with_peaks = [pt for pt in members if pt.stage_peaks]
        xs = [pt.first.vocab_size for pt in with_peaks]
        ax.plot(xs, [max(pt.stage_peaks) / MIB for pt in with_peaks], marker="o", color=color,
                label=f"{label}: most loaded stage")
        ax.plot(xs, [min(pt.stage_peaks) / MIB for pt in with_peaks], marker="x", linestyle="--", color=color,
                label=f"{label}: least loaded stage")
    _vocab_axes(ax, "peak memory per stage (MiB)", f"{title}: per-stage peak memory", vocabs)
    paths.append(_save(fig, out / "peak_memory_vs_vocab.png"))

    paths.append(_busy_bars(plt, pts, out, title, colors))
    measured = [pt for pt in pts if pt.first.kind == "measured" and pt.losses]
    if measured:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        styles = ("-", "--", ":", "-.")
        for i, pt in enumerate(measured):
            # Methods compute the same loss (the equivalence tests hold them to it): their curves
            # coincide, so each gets its own dash and width to stay visible under the others.
            losses = pt.losses
            ax.plot(range(1, len(losses) + 1), losses, color=colors[i % len(colors)], label=pt.name,
                    linestyle=styles[i % len(styles)], linewidth=2.5 - 1.5 * i / max(len(measured), 1))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss" + (" (median of repeats)" if any(len(p.runs) > 1 for p in measured) else ""))
        ax.set_title(f"{title}: loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(_save(fig, out / "loss_vs_step.png"))
    return paths


def _busy_bars(plt, pts: list[Point], out: Path, title: str, colors: list[str]) -> Path:
    """One group of bars per point, one bar per stage; the group's label carries its max/min."""
    shown = [pt for pt in pts if pt.stage_busy]
    stages = max((len(pt.stage_busy) for pt in shown), default=0)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(shown) * max(stages, 1) / 2), 4.8))
    width = 0.8 / max(stages, 1)
    for s in range(stages):
        xs = [i + (s - (stages - 1) / 2) * width for i, pt in enumerate(shown) if s < len(pt.stage_busy)]
        ys = [1000 * pt.stage_busy[s] for pt in shown if s < len(pt.stage_busy)]
        ax.bar(xs, ys, width=width, color=colors[s % len(colors)], label=f"stage {s}")
    labels = []
    for pt in shown:
        ratio = balance(pt.stage_busy)
        kind = " (plan)" if pt.first.kind == "planned" else ""
        labels.append(f"{pt.name}{kind}\nmax/min {ratio:.2f}" if ratio else pt.name + kind)
    ax.set_xticks(range(len(shown)), labels, rotation=30, ha="right", fontsize="small")
    tallest = max((1000 * max(pt.stage_busy) for pt in shown), default=0.0)
    if tallest > 0:
        ax.set_ylim(0, 1.25 * tallest)  # headroom: the legend sits above the bars, not on them
    ax.set_ylabel("busy ms per step (median)")
    ax.set_title(f"{title}: busy time per stage")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(stages, 4))
    return _save(fig, out / "busy_per_stage.png")


def _vocab_axes(ax, ylabel: str, title: str, vocabs: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(vocabs, [f"{v:,}" for v in vocabs])  # the sizes that ran, not powers of two
    ax.minorticks_off()
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
