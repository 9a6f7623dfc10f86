"""Lower a nominal timeline to per-rank action lists with explicit communication.

The operations ranks share follow ONE global order on every rank (DESIGN.md invariant 5): each
transfer and each collective gets one sort key, the same on every rank that takes part,

    transfer:   (nominal time, 0, (sender, receiver, kind, microbatch, chunk))
    collective: (time of the latest transfer it must follow, 1, (position in the collective order,))

Class 0 before 1: at equal times data moves before the collective that follows it. A collective
must follow, on every rank whose input it needs, the transfers that rank runs before that input
exists; its key puts it right after the latest of them (and after the previous collective), so
every rank's shared operations appear in key order and any two ranks run the operations they
share in the same relative order, whatever the communicator.

Compute passes are local and keep their nominal start times (class 2: after the issues of that
moment). On each rank a collective sits after the rank's own input to it and after the rank's
previous shared operation, hence before every pass that consumes it (those start at or after its
nominal completion). A broadcast's receivers post it right after their previous shared operation,
as the simulator's asynchronous issue assumes. (Placing every collective at its nominal completion
on all ranks would also give one order, but delays the ranks that are ready early: 1F1B vocab-2 at
p=8, m=32 went from 18% to 47% simulated bubble.)

Why this cannot deadlock, even if every shared operation blocked until all its ranks reached it:
take the first shared operation (in the global order) that has not finished. Every rank taking part
has reached it: what comes before it on that rank is finished shared operations and compute passes,
and a pass waits only for collectives that rank issued earlier in its list, hence earlier in the
global order, hence issued by every rank already. The validator checks the order of every
schedule (order.py) and re-proves deadlock freedom under the engine's semantics by a dry run.
"""

from __future__ import annotations

import bisect

from vptrain.schedule.ir import Action, PassKind, Schedule
from vptrain.schedule.planner import NominalPlan
from vptrain.schedule.rules import ScheduleRules

K = PassKind

# Order of collectives within one microbatch's chain, to break ties between equal completion times.
CHAIN_ORDER = {
    k: n
    for n, k in enumerate(
        (K.EMB_REDUCE, K.X_BCAST, K.MAX, K.SUM, K.STATS, K.G_BCAST, K.DXHAT, K.DX_REDUCE, K.DEMB_BCAST)
    )
}

Event = tuple[float, int, tuple, Action]


def collective_sequence(plan: NominalPlan) -> list[tuple[PassKind, int]]:
    """The one order in which every rank issues the vocabulary collectives: by nominal completion."""
    return sorted(plan.completion, key=lambda key: (plan.completion[key], CHAIN_ORDER[key[0]], key[1]))


def lower(plan: NominalPlan, rules: ScheduleRules, *, m: int, method: str) -> Schedule:
    p = rules.stages.p
    transfers: list[list[Event]] = [[] for _ in range(p)]
    for t, sender, send, receiver, recv in plan.transfers:
        # The same key on both sides; the planner only transfers when both are between passes.
        # Interlaced: every rank reaches the same boundary at once, so a rank-ordered key would
        # chain the pipeline's transfers one after another; pairs (2k, 2k+1) first, then
        # (2k+1, 2k+2), run each round in parallel.
        pairing = min(sender, receiver) % 2 if rules.method.blocking else 0
        tie = (pairing, sender, receiver, send.kind.value, send.microbatch, send.chunk)
        transfers[sender].append((t, 0, tie, send))
        transfers[receiver].append((t, 0, tie, recv))
    collectives = _collective_events(plan, transfers)
    ranks = []
    for rank in range(p):
        events: list[Event] = [(start, 2, (n,), a) for n, (a, start, _end) in enumerate(plan.computes[rank])]
        events += _place_shared(sorted(transfers[rank] + collectives, key=lambda e: e[:3]), plan, rank)
        ranks.append(tuple(e[3] for e in sorted(events, key=lambda e: e[:3])))
    return Schedule(ranks=tuple(ranks), method=method, name=rules.stages.name, num_microbatches=m,
                    chunks=rules.stages.chunks)


def _collective_events(plan: NominalPlan, transfers: list[list[Event]]) -> list[Event]:
    """Each collective's global key, in collective order. Its time is the latest transfer that some
    rank whose input it needs runs before that input exists (that transfer must come first on that
    rank), and never earlier than the previous collective's. Transfers after it, up to its nominal
    completion, stay after it on every rank, so ranks that are ready early issue early."""
    times = [sorted(e[0] for e in row) for row in transfers]
    events: list[Event] = []
    floor = float("-inf")
    for index, key in enumerate(collective_sequence(plan)):
        for rank, ready in plan.issues[key].items():
            before = bisect.bisect_right(times[rank], ready)
            if before:
                floor = max(floor, times[rank][before - 1])
        events.append((floor, 1, (index,), Action(*key)))
    return events


def _place_shared(shared: list[Event], plan: NominalPlan, rank: int) -> list[Event]:
    """Rank `rank`'s shared operations, given in global order, with the time each is placed at on
    this rank: transfers at their own time, a collective at the later of this rank's readiness and
    its previous shared operation (ties keep the global order: class, then sequence index)."""
    placed: list[Event] = []
    floor = float("-inf")
    for time, cls, tie, a in shared:
        if cls == 1:
            time = max(floor, plan.issues[(a.kind, a.microbatch)].get(rank, float("-inf")))
        floor = time
        placed.append((time, cls, tie, a))
    return placed
