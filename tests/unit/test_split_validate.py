"""The validator on the split backward: W exactly where the schedule splits (zb-h1, vhalf), after
its B on the same rank, never on 1f1b; mutants of valid schedules are rejected by name."""

from __future__ import annotations

import dataclasses

import pytest

from vptrain.schedule import Action, PassKind, Schedule, build_schedule, validate_schedule
from vptrain.schedule.validate import ScheduleError

K = PassKind


def _with_row(s: Schedule, rank: int, row: list[Action]) -> Schedule:
    ranks = list(s.ranks)
    ranks[rank] = tuple(row)
    return dataclasses.replace(s, ranks=tuple(ranks))


@pytest.mark.parametrize("method, schedule", [("baseline", "zb-h1"), ("vocab-2", "zb-h1"), ("vocab-1", "vhalf")])
def test_every_b_has_its_w_after_it_on_the_same_rank(method: str, schedule: str) -> None:
    s = build_schedule(method, schedule, 3, 6)
    validate_schedule(s)
    for row in s.ranks:
        bs = [a for a in row if a.kind is K.B]
        ws = [a for a in row if a.kind is K.W]
        assert sorted((a.microbatch, a.chunk) for a in bs) == sorted((a.microbatch, a.chunk) for a in ws)
        for w in ws:
            assert row.index(Action(K.B, w.microbatch, w.chunk)) < row.index(w)


@pytest.mark.parametrize("schedule", ["zb-h1", "vhalf"])
def test_w_before_its_b_is_rejected(schedule: str) -> None:
    s = build_schedule("vocab-2", schedule, 2, 4)
    row = list(s.ranks[1])
    w = next(a for a in row if a.kind is K.W)
    row.remove(w)
    row.insert(row.index(Action(K.B, w.microbatch, w.chunk)), w)
    with pytest.raises(ScheduleError, match=rf"rank 1.*{w}"):
        validate_schedule(_with_row(s, 1, row))


@pytest.mark.parametrize("schedule", ["zb-h1", "vhalf"])
def test_missing_w_is_rejected(schedule: str) -> None:
    s = build_schedule("baseline", schedule, 2, 4)
    row = list(s.ranks[0])
    w = [a for a in row if a.kind is K.W][-1]
    row.remove(w)
    with pytest.raises(ScheduleError, match="W"):
        validate_schedule(_with_row(s, 0, row))


def test_w_on_an_unsplit_schedule_is_rejected() -> None:
    s = build_schedule("vocab-1", "1f1b", 2, 4)
    row = list(s.ranks[0])
    row.append(Action(K.W, 0))
    with pytest.raises(ScheduleError, match="W"):
        validate_schedule(_with_row(s, 0, row))


def test_w_on_another_rank_is_rejected() -> None:
    s = build_schedule("vocab-2", "zb-h1", 2, 4)
    rows = [list(r) for r in s.ranks]
    w = next(a for a in rows[0] if a.kind is K.W)
    rows[0].remove(w)
    rows[1].append(w)  # rank 1 now runs W0 twice and rank 0 never
    with pytest.raises(ScheduleError, match="W"):
        validate_schedule(dataclasses.replace(s, ranks=tuple(tuple(r) for r in rows)))


@pytest.mark.parametrize("schedule", ["zb-h1", "vhalf"])
def test_ib_moves_freely_after_its_broadcast(schedule: str) -> None:
    """IB's only need is its DEMB_BCAST (docs/schedules.md): every rank's first IB moved to the very
    end of its list is still a valid schedule; moved in front of its broadcast, it is refused."""
    s = build_schedule("vocab-2", schedule, 3, 6)
    late = s
    for rank, row in enumerate(s.ranks):
        row = list(row)
        row.remove(Action(K.IB, 0))
        late = _with_row(late, rank, [*row, Action(K.IB, 0)])
    validate_schedule(late)
    row = list(s.ranks[2])
    row.remove(Action(K.IB, 0))
    row.insert(row.index(Action(K.DEMB_BCAST, 0)), Action(K.IB, 0))
    with pytest.raises(ScheduleError, match="IB0"):
        validate_schedule(_with_row(s, 2, row))
