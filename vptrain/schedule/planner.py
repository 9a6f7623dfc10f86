"""Nominal timeline: decides where the vocabulary passes go and when every transfer happens.

The builders give each rank its F/B order (1F1B, or the V-Half building block). This event-driven
dry run, with fixed nominal costs, then
  * places the vocabulary passes and collectives (`vocab.py`), and
  * places every blocking transfer at a moment when both its sender and its receiver are between
    passes, so that under the engine's rendezvous semantics nobody waits in nominal time.
The result (`NominalPlan`) records times only; `lower.py` turns it into per-rank action lists.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from vptrain.schedule.interlaced import InterlacedVocab
from vptrain.schedule.ir import Action, PassKind
from vptrain.schedule.nogc import paused_gc
from vptrain.schedule.rules import ScheduleRules
from vptrain.schedule.vocab import NoVocab, OverlappedVocab

K = PassKind
Key = tuple[PassKind, int]  # a collective instance: (kind, microbatch)


@dataclass(frozen=True)
class NominalCosts:
    """Relative pass durations for placement only (a chunk's B about twice its F, vocabulary passes
    a fraction of a chunk). Real costs come from `costs.py` and are used by the simulator."""

    f: float = 1.0
    b: float = 2.0
    w: float = 0.0
    """A split backward's W (its B is then `b`, the input gradient only)."""
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
    p2p: float = 0.0
    """A blocking transfer keeps its sender and its receiver busy this long (0: free)."""
    collective: tuple[tuple[PassKind, float], ...] = ()
    """(kind, time from its last issue to its completion); kinds not listed complete at once."""

    def table(self) -> dict[PassKind, float]:
        return {K.F: self.f, K.B: self.b, K.W: self.w, K.S: self.s, K.T: self.t, K.IF: self.input_f, K.IB: self.input_b}

    def latency(self, kind: PassKind) -> float:
        for k, seconds in reversed(self.collective):  # as dict(self.collective): the last one wins
            if k is kind:
                return seconds
        return 0.0

    def without_communication(self) -> NominalCosts:
        return dataclasses.replace(self, p2p=0.0, collective=())


@dataclass
class NominalPlan:
    computes: list[list[tuple[Action, float, float]]]
    """Per rank: (compute pass, start, end) in execution order."""
    transfers: list[tuple[float, int, Action, int, Action]]
    """(time, sender, send action, receiver, receive action)."""
    issues: dict[Key, dict[int, float]]
    """Issue time per constrained rank; ranks absent from the dict may issue whenever they like."""
    completion: dict[Key, float]


_FINISH, _WAKE, _RELEASE, _CALL = 0, 1, 2, 3


class Planner:
    """One nominal run. `vocab` (see vocab.py) calls back into `wake_all`, `release_at`, `busy`,
    `cost`, `costs`, `plan`, `p`, `m` and `rules`.

    Where the schedule splits the backward, the orders either list every W (V-Half's block) or
    none; then `w_caps[r]` makes the W passes fillers (ZB-H1): each B's W joins the rank's queue
    and runs when the next pass of the order is not ready, or before an F that would keep more than
    `w_caps[r]` microbatch-chunks alive (F run, W not), or once the order is done. `w_reserve[r]`
    (default 0) keeps that many W queued on rank r through idle moments for the cool-down,
    where the other ranks' last passes leave the longest gaps."""

    def __init__(self, rules: ScheduleRules, m: int, orders: list[list[Action]], costs: NominalCosts,
                 w_caps: list[int] | None = None, w_reserve: tuple[int, ...] | None = None):
        self.rules, self.m, self.orders, self.costs = rules, m, orders, costs
        self.w_caps = w_caps
        self.w_reserve = w_reserve or (0,) * len(orders)
        self.pending_w: list[list[Action]] = [[] for _ in orders]
        self.alive = [0] * len(orders)  # microbatch-chunks whose F ran and whose W (B) has not
        self.cost = costs.table()
        self.p = rules.stages.p
        stages = rules.stages
        # (rank, chunk) -> the neighbouring stage's place (None at the ends): read per pass.
        self.next_place = [[stages.next_place(r, c) for c in range(stages.chunks)] for r in range(self.p)]
        self.prev_place = [[stages.prev_place(r, c) for c in range(stages.chunks)] for r in range(self.p)]
        self.pos = [0] * self.p
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.busy = [False] * self.p
        self.in_transfer = [False] * self.p
        self.input_at: set[tuple[int, int, int]] = set()  # (rank, mb, chunk): F input has arrived
        self.grad_at: set[tuple[int, int, int]] = set()  # (rank, mb, chunk): B gradient has arrived
        self.f_done: set[tuple[int, int, int]] = set()
        self.b_done: set[tuple[int, int, int]] = set()
        self.plan = NominalPlan([[] for _ in range(self.p)], [], {}, {})
        self.calls: list[Callable[[float], None]] = []
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
            elif event == _CALL:
                self.calls[r](t)
            else:
                if event == _RELEASE:
                    self.busy[r] = False
                    if self.in_transfer[r]:
                        self.in_transfer[r] = False
                        for peer in (r - 1, r + 1):  # may wait for this rank (see _decide)
                            if 0 <= peer < self.p:
                                self.wake(peer, t)
                self._decide(r, t)
        per_chunk = 3 if self.rules.split_backward else 2
        expected = self.m * (per_chunk * self.rules.stages.chunks + (4 if self.rules.method.vocab else 0))
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
            self.seq += 1
            heapq.heappush(self.heap, (t, self.seq, _WAKE, r))

    def wake_all(self, t: float) -> None:
        busy, heap = self.busy, self.heap
        for r in range(self.p):
            if not busy[r]:
                self.seq += 1
                heapq.heappush(heap, (t, self.seq, _WAKE, r))

    def release_at(self, r: int, t: float) -> None:
        """A rank kept busy by a barrier (or a transfer) becomes free at t."""
        self._event(t, _RELEASE, r)

    def call_at(self, t: float, call: Callable[[float], None]) -> None:
        """Run `call(t)` at time t (a collective completing after its latency)."""
        self.calls.append(call)
        self._event(t, _CALL, len(self.calls) - 1)

    # -------------------------------------------------------------- decisions
    def _decide(self, r: int, t: float) -> None:
        busy = self.busy
        if busy[r]:
            return
        if self.outbox[r] or self.inbox[r]:
            self._exchange(r, t)
            if busy[r] or self._peer_in_transfer(r):
                return
        if self.vocab.join(r, t):
            return
        action = self.vocab.take(r, t) or self._next_base(r)
        filler = self._filler_w(r, action)
        if filler is not None:
            action = filler
        if action is None:
            return  # idle until a transfer, a collective or a barrier wakes it
        kind = action.kind
        base = kind is K.F or kind is K.B
        if base and self.vocab.hold(r, t):
            return
        busy[r] = True
        end = t + self.cost[kind]
        self.plan.computes[r].append((action, t, end))
        if filler is not None:
            self.pending_w[r].pop(0)
        elif base or kind is K.W:
            self.pos[r] += 1
        self.alive[r] += kind is K.F
        self.alive[r] -= kind is K.W or (kind is K.B and not self.rules.split_backward)
        self.vocab.started(r, action, t)
        self.seq += 1
        heapq.heappush(self.heap, (end, self.seq, _FINISH, r))

    def _filler_w(self, r: int, action: Action | None) -> Action | None:
        """The queued W to run now instead of `action` (None: run `action`)."""
        queue = self.pending_w[r]
        if not queue:
            return None
        if action is None and (len(queue) > self.w_reserve[r] or self.pos[r] >= len(self.orders[r])):
            return queue[0]
        if action is not None and action.kind is K.F and self.alive[r] >= self.w_caps[r]:
            return queue[0]
        return None

    def _next_base(self, r: int) -> Action | None:
        order = self.orders[r]
        if self.pos[r] < len(order) and self._ready(r, order[self.pos[r]]):
            return order[self.pos[r]]
        return None

    def _ready(self, r: int, a: Action) -> bool:
        kind, i, c = a
        if kind is K.F:
            if self.prev_place[r][c] is None:
                return self.vocab.input_ready(i)
            return (r, i, c) in self.input_at
        if kind is K.W:
            return (r, i, c) in self.b_done
        if (r, i, c) not in self.f_done:
            return False
        if self.next_place[r][c] is None:
            return self.vocab.loss_grad_ready(i)
        return (r, i, c) in self.grad_at

    def _finish(self, r: int, t: float) -> None:
        a = self.plan.computes[r][-1][0]
        self.busy[r] = False
        kind = a.kind
        if kind is K.F:
            self.f_done.add((r, a.microbatch, a.chunk))
            nxt = self.next_place[r][a.chunk]
            if nxt is not None:
                self._post(self.input_at, r, Action(K.SEND_F, a.microbatch, a.chunk), nxt, K.RECV_F)
        elif kind is K.B:
            self.b_done.add((r, a.microbatch, a.chunk))
            if self.w_caps is not None and self.rules.split_backward:
                self.pending_w[r].append(Action(K.W, a.microbatch, a.chunk))
            prev = self.prev_place[r][a.chunk]
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
        """Run every pending transfer of rank r whose peer is also between passes (or idle); with
        a transfer cost, only the first (both ranks are busy with it until it ends)."""
        busy = self.busy
        for send, dest, recv in [x for x in self.outbox[r] if not busy[x[1]]]:
            if busy[r]:
                return
            self._transfer(t, r, send, dest, recv)
        for src, send, recv in [x for x in self.inbox[r] if not busy[x[0]]]:
            if busy[r]:
                return
            self._transfer(t, src, send, r, recv)

    def _peer_in_transfer(self, r: int) -> bool:
        """A pending transfer's peer is busy only with another transfer: wait for it (a moment)
        rather than start a pass and make the peer wait for that whole pass."""
        in_transfer = self.in_transfer
        for x in self.outbox[r]:
            if in_transfer[x[1]]:
                return True
        for x in self.inbox[r]:
            if in_transfer[x[0]]:
                return True
        return False

    def _transfer(self, t: float, src: int, send: Action, dest: int, recv: Action) -> None:
        self.outbox[src].remove((send, dest, recv))
        self.inbox[dest].remove((src, send, recv))
        self.plan.transfers.append((t, src, send, dest, recv))
        arrived = self.input_at if send.kind is K.SEND_F else self.grad_at
        arrived.add((dest, recv.microbatch, recv.chunk))  # the receiver is busy until it is in
        if self.costs.p2p > 0:
            for rank in (src, dest):
                self.busy[rank] = self.in_transfer[rank] = True
                self.release_at(rank, t + self.costs.p2p)
            return
        self.wake(src, t)
        self.wake(dest, t)


def plan_nominal(rules: ScheduleRules, m: int, orders: list[list[Action]], costs: NominalCosts,
                 w_caps: list[int] | None = None, w_reserve: tuple[int, ...] | None = None) -> NominalPlan:
    """Run the nominal timeline for the given per-rank F/B(/W) orders (`w_caps`, `w_reserve`: see
    Planner)."""
    with paused_gc():
        return Planner(rules, m, orders, costs, w_caps, w_reserve).run()
