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
