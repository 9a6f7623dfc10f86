"""Schedules with two communication actions of one rank the other way round (order mutants)."""

from __future__ import annotations

import dataclasses

from vptrain.schedule import Schedule, ScheduleRules
from vptrain.schedule.order import ALL, shared_op


def move_before(s: Schedule, rank: int, i: int, j: int) -> Schedule:
    """Move rank's action at j (> i) to just before position i."""
    row = list(s.ranks[rank])
    row.insert(i, row.pop(j))
    ranks = list(s.ranks)
    ranks[rank] = tuple(row)
    return dataclasses.replace(s, ranks=tuple(ranks))


def swappable_pairs(s: Schedule, rank: int) -> list[tuple[int, int]]:
    """(i, j): consecutive communication actions of `rank` that share a peer, where moving the
    later one before the earlier keeps every same-rank rule: only the pair order breaks."""
    rules = ScheduleRules.of(method=s.method, name=s.name, p=s.p)
    row = s.ranks[rank]
    comm = [n for n, a in enumerate(row) if not a.kind.is_compute]
    pairs = []
    for i, j in zip(comm, comm[1:], strict=False):
        x, y = shared_op(rules, rank, row[i]), shared_op(rules, rank, row[j])
        assert x is not None and y is not None
        if ALL not in (x.peer, y.peer) and x.peer != y.peer:
            continue  # transfers with two different neighbours: no rank shares both
        needs = rules.needs(rank, row[j])
        if set(needs.after + needs.waits) & set(row[i:j]):
            continue  # the later one depends on the earlier one or on a pass in between
        pairs.append((i, j))
    return pairs
