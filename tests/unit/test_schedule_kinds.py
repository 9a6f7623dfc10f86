"""Every consumer handles every PassKind (torch's simulator rejected its own UNSHARD; not here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vptrain.schedule import (
    PassCosts,
    PassKind,
    Schedule,
    build_schedule,
    format_schedule,
    memory_profile,
    parse_schedule,
    render_ascii,
    render_order,
    render_png,
    simulate,
    validate_schedule,
)
from vptrain.schedule.render import KIND_COLORS

K = PassKind


def _schedule_containing(kind: PassKind) -> Schedule:
    candidates = [
        build_schedule("vocab-naive", "1f1b", 3, 4),
        build_schedule("vocab-2", "vhalf", 2, 4),  # W: the split backward
        build_schedule("vocab-1", "zb-h1", 2, 4),
    ]
    for s in candidates:
        if any(a.kind is kind for row in s.ranks for a in row):
            return s
    raise AssertionError(f"no test schedule contains {kind}")


@pytest.mark.parametrize("kind", list(PassKind), ids=lambda k: k.value)
def test_every_consumer_handles(kind: PassKind, tmp_path: Path) -> None:
    s = _schedule_containing(kind)
    validate_schedule(s)
    costs = PassCosts.uniform(s.p, s.chunks, f=1, b=2, w=0.5, s=0.3, t=0.3, input_f=0.1, input_b=0.1,
                              p2p=0.05, collective=0.02)
    sim = simulate(s, costs)
    assert sim.makespan > 0
    memory_profile(s, costs)
    assert parse_schedule(format_schedule(s)) == s
    for comms in (False, True):
        assert render_ascii(s, comms=comms)
        grid = render_ascii(s, sim=sim, comms=comms, max_columns=None)
        if comms or kind.is_compute:
            assert any(kind.value in line for line in grid.splitlines())
    marked = render_order(s, marks={(0, 0)})
    assert ">" in marked
    render_png(s, sim, str(tmp_path / f"{kind.value}.png"))
    assert (tmp_path / f"{kind.value}.png").stat().st_size > 1000


def test_every_kind_has_a_colour_and_a_category() -> None:
    assert set(KIND_COLORS) == set(PassKind)
    for kind in PassKind:
        assert [kind.is_compute, kind.is_p2p, kind.is_collective].count(True) == 1


def test_the_time_view_names_every_compute_pass() -> None:
    """No pass hides behind another that starts in the same column (vocab-1 at p=2 starts IF0, IF1,
    IF2 and F0 within one forward's time on rank 0)."""
    from vptrain.schedule import build_schedule

    s = build_schedule("vocab-1", "1f1b", 2, 8)
    costs = PassCosts.uniform(s.p, s.chunks, f=1, b=2, w=0.5, s=0.3, t=0.3, input_f=0.1, input_b=0.1,
                              p2p=0.05, collective=0.02)
    grid = render_ascii(s, sim=simulate(s, costs), max_columns=None).splitlines()
    for rank, row in enumerate(s.ranks):
        shown = [cell for cell in grid[rank].split("|", 1)[1].replace(",", " ").split() if cell != "."]
        assert shown == [str(a) for a in row if a.kind.is_compute], f"rank {rank}: {grid[rank]}"


def test_a_long_schedule_picture_keeps_warm_up_and_cool_down_at_full_size(tmp_path: Path) -> None:
    """schedule.png at m=128 is not a barcode: the steady state between two kept rounds is cut."""
    from vptrain.schedule import Action, build_schedule
    from vptrain.schedule.render import TimeAxis

    costs = lambda s: PassCosts.uniform(s.p, s.chunks, f=1, b=2, w=0.5, s=0.3, t=0.3, input_f=0.1,  # noqa: E731
                                        input_b=0.1, p2p=0.05, collective=0.02)
    short = build_schedule("vocab-2", "1f1b", 4, 16)
    assert not TimeAxis.of(short, simulate(short, costs(short))).elided  # m = 4p: drawn whole
    for schedule in ("1f1b", "vhalf"):
        s = build_schedule("vocab-1", schedule, 4, 128)
        sim = simulate(s, costs(s))
        axis = TimeAxis.of(s, sim)
        assert axis.elided and axis.shown < sim.makespan / 3, (schedule, axis)
        row = s.ranks[0]
        first = row.index(Action(PassKind.F, 0))
        last = row.index(Action(PassKind.B, 127))
        for n in (first, last):  # the ends of the pipeline keep their true length
            (shown,) = axis.visible(sim.start[0][n], sim.end[0][n])
            assert shown[1] - shown[0] == pytest.approx(sim.end[0][n] - sim.start[0][n])
        middle = row.index(Action(PassKind.F, 64, 0))
        assert axis.visible(sim.start[0][middle], sim.end[0][middle]) == []  # inside the cut
        straddling = [x for part in axis.visible(axis.cut_from - 1, axis.cut_to + 1) for x in part]
        after_cut = axis.cut_from + axis.gap
        assert straddling == pytest.approx([axis.cut_from - 1, axis.cut_from, after_cut, after_cut + 1])
        render_png(s, sim, str(tmp_path / f"{schedule}.png"))
        assert (tmp_path / f"{schedule}.png").stat().st_size > 10_000
