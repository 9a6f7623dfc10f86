"""Lower a nominal timeline to per-rank action lists with explicit communication.

Every rank's list is the projection of ONE global sequence of events sorted by nominal time: a
p2p transfer is a single event shared by its sender and receiver, and each rank's collective issues
follow one global collective order. That is what makes the result deadlock-free under the engine's
semantics (blocking p2p rendezvous, async collectives, blocking waits): take the earliest event not
yet finished; everything sorted before it has finished, so every rank taking part has reached it,
and everything it needs (the peer of a transfer, the issues of an awaited collective) sorts before
it. The simulator re-proves this for every schedule the builders emit.

Sort key: (time, class, tie-break) with class 0 = p2p, 1 = collective issue, 2 = compute, so at
equal times data moves before the pass that consumes it, and issues come before waits.
"""

from __future__ import annotations

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


def collective_sequence(plan: NominalPlan) -> list[tuple[PassKind, int]]:
    """The one order in which every rank issues the vocabulary collectives: by nominal completion."""
    return sorted(plan.completion, key=lambda key: (plan.completion[key], CHAIN_ORDER[key[0]], key[1]))


def lower(plan: NominalPlan, rules: ScheduleRules, *, m: int, method: str) -> Schedule:
    p = rules.stages.p
    events: list[list[tuple[float, int, tuple, Action]]] = [[] for _ in range(p)]
    for rank, records in enumerate(plan.computes):
        for n, (action, start, _end) in enumerate(records):
            events[rank].append((start, 2, (n,), action))
    for t, sender, send, receiver, recv in plan.transfers:
        # The same key on both sides, so both ranks place the rendezvous at the same point; the
        # planner only transfers when both are between passes, so nobody waits in nominal time.
        tie = (sender, receiver, send.kind.value, send.microbatch, send.chunk)
        events[sender].append((t, 0, tie, send))
        events[receiver].append((t, 0, tie, recv))
    for rank in range(p):
        # A rank issues collective k once its own inputs exist and after it issued k-1; receivers of
        # a broadcast have no inputs and simply follow the previous issue.
        issued_at = float("-inf")
        for index, key in enumerate(collective_sequence(plan)):
            issued_at = max(issued_at, plan.issues[key].get(rank, float("-inf")))
            events[rank].append((issued_at, 1, (index,), Action(key[0], key[1])))
    ranks = tuple(tuple(e[3] for e in sorted(row, key=lambda e: e[:3])) for row in events)
    return Schedule(ranks=ranks, method=method, name=rules.stages.name, num_microbatches=m, chunks=rules.stages.chunks)

