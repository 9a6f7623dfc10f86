"""Nominal timeline: decides where the vocabulary passes go and when every transfer happens.

The builders give each rank its F/B order (1F1B, or the V-Half building block). This event-driven
dry run, with fixed nominal costs, then
  * places the vocabulary passes and collectives (`vocab.py`), and
  * places every blocking transfer at a moment when both its sender and its receiver are between
    passes, so that under the engine's rendezvous semantics nobody waits in nominal time.
The result (`NominalPlan`) records times only; `lower.py` turns it into per-rank action lists.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from vptrain.schedule.ir import Action, PassKind
from vptrain.schedule.rules import ScheduleRules
from vptrain.schedule.interlaced import InterlacedVocab
from vptrain.schedule.vocab import NoVocab, OverlappedVocab

K = PassKind
Key = tuple[PassKind, int]  # a collective instance: (kind, microbatch)


@dataclass(frozen=True)
class NominalCosts:
    """Relative pass durations for placement only (a chunk's B about twice its F, vocabulary passes
    a fraction of a chunk). Real costs come from `costs.py` and are used by the simulator."""

    f: float = 1.0
    b: float = 2.0
    s: float = 0.25
    t: float = 0.25
    input_f: float = 0.05
    input_b: float = 0.05
    if_lookahead: int = 2
    """IF(j) is released when stage 0 starts F(j - if_lookahead - 1); the first ones at time 0."""
    hold_window: float = 0.0
    """How long (in these units) a rank stays idle for a vocabulary step about to become due rather
    than start an F/B in front of it (vocab.OverlappedVocab.hold)."""
    sync_first_inputs: int = 0
    """Interlaced: how many microbatches' input layers the first barrier runs (the warm-up's)."""

    def table(self) -> dict[PassKind, float]:
        return {K.F: self.f, K.B: self.b, K.S: self.s, K.T: self.t, K.IF: self.input_f, K.IB: self.input_b}


@dataclass
class NominalPlan:
    computes: list[list[tuple[Action, float, float]]]
    """Per rank: (compute pass, start, end) in execution order."""
    transfers: list[tuple[float, int, Action, int, Action]]
    """(time, sender, send action, receiver, receive action)."""
    issues: dict[Key, dict[int, float]]
    """Issue time per constrained rank; ranks absent from the dict may issue whenever they like."""
    completion: dict[Key, float]


_FINISH, _WAKE, _RELEASE = 0, 1, 2


class Planner:
    """One nominal run. `vocab` (see vocab.py) calls back into `wake_all`, `release_at`, `busy`,
    `cost`, `costs`, `plan`, `p`, `m` and `rules`."""

    def __init__(self, rules: ScheduleRules, m: int, orders: list[list[Action]], costs: NominalCosts):
        self.rules, self.m, self.orders, self.costs = rules, m, orders, costs
        self.cost = costs.table()
        self.p = rules.stages.p
        self.pos = [0] * self.p
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.busy = [False] * self.p
        self.input_at: set[tuple[int, int, int]] = set()  # (rank, mb, chunk): F input has arrived
        self.grad_at: set[tuple[int, int, int]] = set()  # (rank, mb, chunk): B gradient has arrived
        self.f_done: set[tuple[int, int, int]] = set()
        self.plan = NominalPlan([[] for _ in range(self.p)], [], {}, {})
        # Blocking transfers wait until sender and receiver are both between passes.
        self.outbox: list[list[tuple[Action, int, Action]]] = [[] for _ in range(self.p)]
        self.inbox: list[list[tuple[int, Action, Action]]] = [[] for _ in range(self.p)]
        method = rules.method
        self.vocab: NoVocab = (
            InterlacedVocab(self) if method.blocking else OverlappedVocab(self) if method.vocab else NoVocab(self)
        )

    def run(self) -> NominalPlan:
        self.vocab.start()
        self.wake_all(0.0)
        while self.heap:
            t, _, event, r = heapq.heappop(self.heap)
            if event == _FINISH:
                self._finish(r, t)
            else:
                if event == _RELEASE:
                    self.busy[r] = False
                self._decide(r, t)
        expected = self.m * (2 * self.rules.stages.chunks + (4 if self.rules.method.vocab else 0))
        stalled = [r for r in range(self.p) if len(self.plan.computes[r]) != expected]
        if stalled:
            raise AssertionError(f"nominal plan stalled on ranks {stalled} (builder bug)")
        return self.plan

    # ------------------------------------------------------------- callbacks
    def _event(self, t: float, event: int, r: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, event, r))

    def wake(self, r: int, t: float) -> None:
        if not self.busy[r]:
            self._event(t, _WAKE, r)

    def wake_all(self, t: float) -> None:
        for r in range(self.p):
            self.wake(r, t)

    def release_at(self, r: int, t: float) -> None:
        """A rank kept busy by a barrier becomes free at t."""
        self._event(t, _RELEASE, r)

    # -------------------------------------------------------------- decisions
    def _decide(self, r: int, t: float) -> None:
        if self.busy[r]:
            return
        self._exchange(r, t)
        if self.vocab.join(r, t):
            return
        action = self.vocab.take(r, t) or self._next_base(r)
        if action is None or (action.kind in (K.F, K.B) and self.vocab.hold(r, t)):
            return  # idle until a transfer, a collective or a barrier wakes it
        self.busy[r] = True
        self.plan.computes[r].append((action, t, t + self.cost[action.kind]))
        if action.kind in (K.F, K.B):
            self.pos[r] += 1
        self.vocab.started(r, action, t)
        self._event(t + self.cost[action.kind], _FINISH, r)

    def _next_base(self, r: int) -> Action | None:
        order = self.orders[r]
        if self.pos[r] < len(order) and self._ready(r, order[self.pos[r]]):
            return order[self.pos[r]]
        return None

    def _ready(self, r: int, a: Action) -> bool:
        i, c = a.microbatch, a.chunk
        stages = self.rules.stages
        if a.kind is K.F:
            if stages.prev_place(r, c) is None:
                return self.vocab.input_ready(i)
            return (r, i, c) in self.input_at
        if (r, i, c) not in self.f_done:
            return False
        if stages.next_place(r, c) is None:
            return self.vocab.loss_grad_ready(i)
        return (r, i, c) in self.grad_at

    def _finish(self, r: int, t: float) -> None:
        a = self.plan.computes[r][-1][0]
        self.busy[r] = False
        stages = self.rules.stages
        if a.kind is K.F:
            self.f_done.add((r, a.microbatch, a.chunk))
            nxt = stages.next_place(r, a.chunk)
            if nxt is not None:
                self._post(self.input_at, r, Action(K.SEND_F, a.microbatch, a.chunk), nxt, K.RECV_F)
        elif a.kind is K.B:
            prev = stages.prev_place(r, a.chunk)
            if prev is not None:
                self._post(self.grad_at, r, Action(K.SEND_B, a.microbatch, a.chunk), prev, K.RECV_B)
        self.vocab.finished(r, a, t)
        self.wake(r, t)

    # ------------------------------------------------------------- transfers
    def _post(self, arrived: set, r: int, send: Action, place: tuple[int, int], recv_kind: PassKind) -> None:
        dest, dest_chunk = place
        if dest == r:  # the V's turn on rank p-1 is local
            arrived.add((dest, send.microbatch, dest_chunk))
            return
        recv = Action(recv_kind, send.microbatch, dest_chunk)
        self.outbox[r].append((send, dest, recv))
        self.inbox[dest].append((r, send, recv))

    def _exchange(self, r: int, t: float) -> None:
        """Run every pending transfer of rank r whose peer is also between passes (or idle)."""
        for send, dest, recv in [x for x in self.outbox[r] if not self.busy[x[1]]]:
            self._transfer(t, r, send, dest, recv)
        for src, send, recv in [x for x in self.inbox[r] if not self.busy[x[0]]]:
            self._transfer(t, src, send, r, recv)

    def _transfer(self, t: float, src: int, send: Action, dest: int, recv: Action) -> None:
        self.outbox[src].remove((send, dest, recv))
        self.inbox[dest].remove((src, send, recv))
        self.plan.transfers.append((t, src, send, dest, recv))
        arrived = self.input_at if send.kind is K.SEND_F else self.grad_at
        arrived.add((dest, recv.microbatch, recv.chunk))
        self.wake(src, t)
        self.wake(dest, t)


def plan_nominal(rules: ScheduleRules, m: int, orders: list[list[Action]], costs: NominalCosts) -> NominalPlan:
    """Run the nominal timeline for the given per-rank F/B orders."""
    return Planner(rules, m, orders, costs).run()
