"""Draw schedules: ASCII grids for terminals and error messages, and a PNG timeline.

Two ASCII views:
  * order view (`render_order`): row r lists rank r's actions in execution order; used in error
    messages, with offending cells marked as >B3<;
  * time view (`render_ascii(s, sim=...)`): columns are the distinct start times of the simulated
    passes, so a pass sits in the same column as everything that starts with it (with uniform
    costs this is the familiar staircase). Empty cells are idle time or a pass still running.
Long rows are cut in the middle, keeping the warm-up and the cool-down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vptrain.schedule.ir import Action, PassKind, Schedule
from vptrain.schedule.simulate import SimResult

K = PassKind

# Paper-like palette: forward blues, backward greens, output layer S/T oranges, input layer
# IF/IB purples, reserved W grey; communication is drawn as thin dark ticks.
KIND_COLORS: dict[PassKind, str] = {
    K.F: "#4C78A8",
    K.B: "#54A24B",
    K.W: "#9D9D9D",
    K.S: "#F58518",
    K.T: "#E45756",
    K.IF: "#B279A2",
    K.IB: "#7B4173",
    K.SEND_F: "#1F3B57",
    K.RECV_F: "#1F3B57",
    K.SEND_B: "#2B5227",
    K.RECV_B: "#2B5227",
    K.X_BCAST: "#333333",
    K.MAX: "#333333",
    K.SUM: "#333333",
    K.STATS: "#333333",
    K.G_BCAST: "#333333",
    K.DXHAT: "#333333",
    K.DX_REDUCE: "#333333",
    K.EMB_REDUCE: "#333333",
    K.DEMB_BCAST: "#333333",
}


def _cut(columns: int, max_columns: int | None) -> list[int | None]:
    """Column indices to show; None marks the elided middle."""
    if max_columns is None or columns <= max_columns:
        return list(range(columns))
    head = max_columns * 2 // 3
    tail = max_columns - head - 1
    return list(range(head)) + [None] + list(range(columns - tail, columns))


def _grid(rows: list[list[str]], max_columns: int | None, label: str = "rank") -> str:
    columns = max((len(r) for r in rows), default=0)
    keep = _cut(columns, max_columns)
    width = max((len(c) for r in rows for c in r), default=2) + 1
    name_width = len(f"{label} {len(rows) - 1}")
    lines = []
    for n, row in enumerate(rows):
        cells = []
        for c in keep:
            text = "..." if c is None else (row[c] if c < len(row) else "")
            cells.append(text.ljust(width))
        lines.append(f"{label} {n}".ljust(name_width) + " | " + "".join(cells).rstrip())
    return "\n".join(lines)


def render_order(
    s: Schedule,
    *,
    comms: bool = True,
    marks: Iterable[tuple[int, int]] = (),
    max_columns: int | None = 40,
) -> str:
    """Order view. `marks` are (rank, position in that rank's full list) cells to highlight. With
    marks, each long row is windowed around its own marked cell (rows without one around the first
    mark's position), so every offending cell stays visible."""
    marks = set(marks)
    rows: list[list[str]] = []
    focus: list[int | None] = []
    for r, row in enumerate(s.ranks):
        cells: list[str] = []
        here: int | None = None
        for n, a in enumerate(row):
            if not comms and not a.kind.is_compute:
                continue
            if (r, n) in marks:
                here = len(cells) if here is None else here
                cells.append(f">{a}<")
            else:
                cells.append(str(a))
        rows.append(cells)
        focus.append(here)
    anchor = next((f for f in focus if f is not None), None)
    if anchor is None or max_columns is None:
        return _grid(rows, max_columns)
    windowed = []
    for cells, here in zip(rows, focus, strict=True):
        lo = max(0, (anchor if here is None else here) - max_columns // 2)
        windowed.append((["..."] if lo else []) + cells[lo : lo + max_columns])
    return _grid(windowed, None)


def render_ascii(
    s: Schedule, *, sim: SimResult | None = None, comms: bool = False, max_columns: int | None = 40
) -> str:
    """The terminal grid: time view when `sim` is given, else order view.

    Time view: one column per time quantum (the shortest forward pass), each pass written in the
    column where it starts and continued with '.' while it runs; blank cells are idle time. Every
    pass starting in a column is listed, in start order, separated by commas (`IF0,IF1,IF2`: three
    short passes within one quantum); comms=True adds the transfers and collectives.
    """
    if sim is None:
        return render_order(s, comms=comms, max_columns=max_columns)
    durations = [
        sim.end[r][n] - sim.start[r][n]
        for r, row in enumerate(s.ranks)
        for n, a in enumerate(row)
        if a.kind is K.F
    ]
    quantum = min((d for d in durations if d > 0), default=0.0) or max(sim.makespan, 1.0) / 100
    columns = int(sim.makespan / quantum + 1e-9) + 1
    rows: list[list[str]] = []
    for r, row in enumerate(s.ranks):
        starting: list[list[Action]] = [[] for _ in range(columns)]  # in the rank's order
        running = [False] * columns
        for n, a in enumerate(row):
            if not (comms or a.kind.is_compute):
                continue
            start, end = sim.start[r][n], sim.end[r][n]
            c = min(int(start / quantum + 1e-9), columns - 1)
            starting[c].append(a)
            last = min(int((end - 1e-9) / quantum + 1e-9), columns - 1) if end > start else c
            for k in range(c + 1, last + 1):
                running[k] = True
        cells = []
        for here, busy in zip(starting, running, strict=True):
            cells.append(",".join(str(a) for a in here) if here else ("." if busy else ""))
        rows.append(cells)
    return _grid(rows, max_columns)


def render_png(s: Schedule, sim: SimResult, path: str, *, title: str | None = None) -> None:
    """Timeline picture like the paper's figures: one row per rank, one box per compute pass
    coloured by kind (chunk 1 lighter), its microbatch number inside when it fits; communication
    as thin dark ticks above the boxes.

    The boxes are painted into a pixel array and shown as one image, so a 32-rank, 128-microbatch
    V-Half schedule (tens of thousands of boxes) still renders in well under a second.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    p, makespan = s.p, sim.makespan or 1.0
    width_in, dpi, px_wide, px_row = 14.0, 110, 1800, 20
    image = np.full((p * px_row, px_wide, 3), 255, dtype=np.uint8)
    shades = {(k, c): _shade(to_rgb(KIND_COLORS[k]), c) for k in PassKind for c in (0, 1)}
    axis = TimeAxis.of(s, sim)
    scale = px_wide / axis.shown
    labels: list[tuple[float, int, str]] = []
    present: set[PassKind] = set()
    for r, row in enumerate(s.ranks):
        top = r * px_row
        for n, a in enumerate(row):
            for start, end in axis.visible(sim.start[r][n], sim.end[r][n]):
                x0 = min(int(start * scale), px_wide - 1)
                if not a.kind.is_compute:
                    image[top : top + 2, x0] = shades[(a.kind, 0)]
                    break
                x1 = max(x0 + 1, int(end * scale))
                if x1 - x0 >= 4:
                    x1 -= 1  # a white seam between adjacent boxes
                image[top + 3 : top + px_row - 2, x0:x1] = shades[(a.kind, min(a.chunk, 1))]
                present.add(a.kind)
                if x1 - x0 >= 12:  # the microbatch, and the chunk where a rank holds several (V-Half: 3.1)
                    labels.append(((start + end) / 2, r, f"{a.microbatch}.{a.chunk}" if a.chunk else str(a.microbatch)))
    fig, ax = plt.subplots(figsize=(width_in, 0.45 * p + 1.4), dpi=dpi)
    ax.imshow(image, extent=(0, axis.shown, p - 0.5, -0.5), aspect="auto", interpolation="nearest")
    if len(labels) <= 2000:
        for x, r, text in labels:
            ax.text(x, r + 0.05, text, ha="center", va="center", fontsize=6 if len(text) < 4 else 5)
    handles = [Patch(color=KIND_COLORS[k], label=k.value) for k in PassKind if k in present]
    if handles:
        ax.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=7, framealpha=0.9)
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)], fontsize=7)
    ax.set_ylim(p - 0.5, -1.0)
    ax.set_xlim(0, axis.shown)
    if axis.elided:
        # The cut: a grey band, and the time axis labelled in real seconds on both sides of it.
        ax.axvspan(axis.cut_from, axis.cut_from + axis.gap, color="0.85", zorder=0)
        ax.text(axis.cut_from + axis.gap / 2, p / 2 - 0.5, f"{axis.cut_to - axis.cut_from:.3g} s of\nsteady state",
                ha="center", va="center", rotation=90, fontsize=7)
        ticks = [0.0, axis.cut_from, axis.cut_from + axis.gap, axis.shown]
        ax.set_xticks(ticks, [f"{t:.3g}" for t in (0.0, axis.cut_from, axis.cut_to, makespan)], fontsize=7)
        for label, align in zip(ax.get_xticklabels(), ("left", "right", "left", "right"), strict=True):
            label.set_horizontalalignment(align)  # the two sides of the cut, apart
        ax.set_xlabel("time (s); warm-up and cool-down at full size, the steady state between them elided")
    else:
        ax.set_xlabel("time (s)")
    ax.set_title(title or f"{s.method} / {s.name}: p={p}, m={s.num_microbatches}, bubble {sim.bubble_rate:.1%}")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.6 / fig.get_figheight(), top=1 - 0.45 / fig.get_figheight())
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class TimeAxis:
    """Where the picture's x axis cuts: a long schedule (more than ELIDE_ABOVE_P * p microbatches)
    keeps its warm-up and cool-down at full size and replaces the repetitive steady state between
    them by a narrow band, so a 128-microbatch 1F1B does not become a barcode."""

    makespan: float
    cut_from: float = 0.0
    cut_to: float = 0.0
    gap: float = 0.0

    ELIDE_ABOVE_P = 4  # microbatches per stage beyond which the steady state is elided
    KEEP_ROUNDS = 2  # rounds of p steady-state microbatches kept on each side of the cut

    @property
    def elided(self) -> bool:
        return self.cut_to > self.cut_from

    @property
    def shown(self) -> float:
        """Length of the drawn axis (seconds, with the cut's band in place of what it hides)."""
        return self.makespan - (self.cut_to - self.cut_from) + self.gap

    @classmethod
    def of(cls, s: Schedule, sim: SimResult) -> TimeAxis:
        makespan, p, m = sim.makespan or 1.0, s.p, s.num_microbatches
        if m <= cls.ELIDE_ABOVE_P * p:
            return cls(makespan)
        # Rank 0 runs every microbatch's first-chunk F and B: cut after the F of microbatch
        # (KEEP_ROUNDS + 1) * p (the warm-up and two steady rounds) and before the B of microbatch
        # m - KEEP_ROUNDS * p (two rounds before the cool-down).
        starts = {(a.kind, a.microbatch, a.chunk): sim.start[0][n] for n, a in enumerate(s.ranks[0])}
        cut_from = starts.get((K.F, (cls.KEEP_ROUNDS + 1) * p, 0))
        cut_to = starts.get((K.B, m - cls.KEEP_ROUNDS * p, 0))
        if cut_from is None or cut_to is None or cut_to - cut_from < 0.1 * makespan:
            return cls(makespan)
        return cls(makespan, cut_from, cut_to, gap=0.02 * (makespan - (cut_to - cut_from)))

    def visible(self, start: float, end: float) -> list[tuple[float, float]]:
        """[start, end) in drawn coordinates: the parts outside the cut (none if all inside it)."""
        if not self.elided:
            return [(start, end)]
        shift = self.cut_to - self.cut_from - self.gap
        parts = []
        if start < self.cut_from:
            parts.append((start, min(end, self.cut_from)))
        if end > self.cut_to or (start >= self.cut_to and end == start):
            parts.append((max(start, self.cut_to) - shift, end - shift))
        return parts


def _shade(rgb: tuple[float, float, float], chunk: int) -> tuple[int, ...]:
    """Chunk 1 (the way back up the V) is drawn lighter, like the paper's V-Half figures."""
    mixed = tuple(x + (1.0 - x) * 0.45 for x in rgb) if chunk else rgb
    return tuple(round(255 * x) for x in mixed)


def marked(s: Schedule, cells: Iterable[tuple[int, Action]]) -> set[tuple[int, int]]:
    """(rank, action) pairs -> (rank, position) marks for `render_order`."""
    out = set()
    for r, a in cells:
        if a in s.ranks[r]:
            out.add((r, s.ranks[r].index(a)))
    return out
