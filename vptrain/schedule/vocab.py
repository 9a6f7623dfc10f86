"""Inserting the vocabulary passes and collectives into the nominal timeline (planner.py).

OverlappedVocab (vocab-naive, vocab-1, vocab-2) follows the paper's building blocks
(vp_algorithms §4.1): a rank picks up
  * S(i) as soon as X_BCAST(i) has completed (the loss stage's B(i) waits on the chain behind it),
  * T(i) once G_BCAST(i) has completed,
  * IF(j) a few microbatches before stage 0 needs it (released when stage 0 starts F(j-lookahead-1)),
  * IB(j) once DEMB_BCAST(j) has completed,
before its next F/B pass, and issues each collective right after the pass that produces its input.
Collectives that need an earlier collective's result (SUM after MAX, DXHAT after STATS, the loss
rank's G_BCAST after the statistics) are issued at the rank's first free moment after it exists.

The interlaced baseline's synchronous passes live in interlaced.py.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from vptrain.schedule.ir import Action, PassKind

if TYPE_CHECKING:
    from vptrain.schedule.planner import Planner

K = PassKind
Key = tuple[PassKind, int]


class NoVocab:
    """baseline / redis: the vocabulary layers are inside the first and last stages' F and B."""

    def __init__(self, host: Planner):
        self.host = host

    def start(self) -> None:
        return None

    def join(self, r: int, t: float) -> bool:
        """Interlaced only: True when rank r has joined a barrier (and is busy until it ends)."""
        return False

    def take(self, r: int, t: float) -> Action | None:
        """A vocabulary pass rank r should run now (None: go on with F/B)."""
        return None

    def started(self, r: int, a: Action, t: float) -> None:
        return None

    def finished(self, r: int, a: Action, t: float) -> None:
        return None

    def hold(self, r: int, t: float) -> bool:
        """True: rank r should stay idle rather than start its next F/B (a vocabulary step it
        takes is due within the hold window)."""
        return False

    def input_ready(self, i: int) -> bool:
        return True

    def loss_grad_ready(self, i: int) -> bool:
        return True


class OverlappedVocab(NoVocab):
    def __init__(self, host: Planner):
        super().__init__(host)
        p, method = host.p, host.rules.method
        self.collectives = method.collectives
        self.stats = method.stats
        self.loss_grad = method.loss_grad
        self.loss_rank = host.rules.stages.loss_place[0]
        self.embed_place = host.rules.stages.embed_place
        self.ready_issue: list[deque[Key]] = [deque() for _ in range(p)]
        # Vocabulary passes each rank may pick up, in priority order and oldest first.
        self.ready: dict[PassKind, list[deque[Action]]] = {
            k: [deque() for _ in range(p)] for k in (K.S, K.T, K.IF, K.IB)
        }
        self.released_inputs = -1
        # Known future completions (X_BCAST once the loss rank's F has started, the statistics once
        # every rank has started its S), for `hold`.
        self.due: dict[Key, float] = {}
        self.s_started: dict[int, list[float]] = {}
        stages = host.rules.stages
        self.loss_place = stages.loss_place
        self.follow = {K.S: K.MAX if K.MAX in self.collectives else K.STATS, K.T: K.DX_REDUCE, K.IF: K.EMB_REDUCE}
        self.follow = {k: v for k, v in self.follow.items() if v in self.collectives}

    def start(self) -> None:
        self.release_inputs(self.host.costs.if_lookahead, 0.0)

    def hold(self, r: int, t: float) -> bool:
        """Wait for a vocabulary step due within `hold_window` forwards rather than start an F or B:
        vocab-2: S(i) right after X_BCAST(i) and the DXHAT issue after the statistics, on every
        rank; vocab-1: the loss rank's g broadcast after the statistics. Otherwise the step waits
        for the whole pass (up to a B), and with it the loss stage's B, which waits on the chain
        X_BCAST -> S -> STATS -> DXHAT (vocab-1: ... -> G_BCAST -> T -> DX_REDUCE); a short idle
        can be cheaper than that stall of the whole pipeline (builders.HOLD_CHOICES decides)."""
        window = self.host.costs.hold_window
        if K.DXHAT not in self.collectives:
            # Algorithm 1: only the loss rank's g broadcast after the statistics gates every
            # rank's T (and the loss stage's B behind it); the rest has a microbatch of slack.
            # (vocab-naive: never; the window 0 of the golden schedules: never.)
            return window > 0 and K.STATS in self.collectives and r == self.loss_rank and any(
                at <= t + window for (kind, _), at in self.due.items() if kind is self.stats)
        return any(at <= t + window for at in self.due.values())

    def release_inputs(self, upto: int, t: float) -> None:
        for j in range(self.released_inputs + 1, min(upto, self.host.m - 1) + 1):
            self._to_all(K.IF, Action(K.IF, j))
            self.released_inputs = j
        self.host.wake_all(t)

    def take(self, r: int, t: float) -> Action | None:
        while self.ready_issue[r]:
            self.issue(r, self.ready_issue[r].popleft(), t)
        for queues in self.ready.values():
            if queues[r]:
                return queues[r].popleft()
        return None

    def started(self, r: int, a: Action, t: float) -> None:
        end = t + self.host.cost[a.kind]
        if a.kind is K.F and (r, a.chunk) == self.embed_place:
            self.release_inputs(a.microbatch + self.host.costs.if_lookahead + 1, t)
        latency = self.host.costs.latency
        if a.kind is K.F and (r, a.chunk) == self.loss_place:
            self.due[(K.X_BCAST, a.microbatch)] = end + latency(K.X_BCAST)
        elif a.kind is K.S:
            ends = self.s_started.setdefault(a.microbatch, [])
            ends.append(end)
            if len(ends) == self.host.p:
                self.due[(self.stats, a.microbatch)] = max(ends) + latency(self.stats)

    def finished(self, r: int, a: Action, t: float) -> None:
        kind, i, chunk = a
        if kind is K.F and (r, chunk) == self.loss_place:
            self.issue(r, (K.X_BCAST, i), t)
        elif kind is K.B and (r, chunk) == self.embed_place:
            self.issue(r, (K.DEMB_BCAST, i), t)
        else:
            kind = self.follow.get(kind)
            if kind is not None:
                self.issue(r, (kind, i), t)

    def input_ready(self, i: int) -> bool:
        return (K.EMB_REDUCE, i) in self.host.plan.completion

    def loss_grad_ready(self, i: int) -> bool:
        return (self.loss_grad, i) in self.host.plan.completion

    def issue(self, r: int, key: Key, t: float) -> None:
        issued = self.host.plan.issues.setdefault(key, {})
        issued[r] = t
        # A broadcast completes once its source has issued it (receivers can post any time
        # before); a reduction needs every rank's contribution.
        needed = 1 if key[0] in (K.X_BCAST, K.G_BCAST, K.DEMB_BCAST) else self.host.p
        if len(issued) == needed:
            latency = self.host.costs.latency(key[0])
            if latency > 0:
                self.host.call_at(t + latency, lambda at: self._complete(key, at))
            else:
                self._complete(key, t)

    def _complete(self, key: Key, t: float) -> None:
        self.host.plan.completion[key] = t
        self.due.pop(key, None)
        kind, i = key
        if kind is K.X_BCAST:
            self._to_all(K.S, Action(K.S, i))
        elif kind is K.MAX:
            for q in self.ready_issue:
                q.append((K.SUM, i))
        elif kind is K.G_BCAST:
            self._to_all(K.T, Action(K.T, i))
        elif kind is K.DEMB_BCAST:
            self._to_all(K.IB, Action(K.IB, i))
        if kind is self.stats:
            self.ready_issue[self.loss_rank].append((K.G_BCAST, i))
            if K.DXHAT in self.collectives:
                for q in self.ready_issue:
                    q.append((K.DXHAT, i))
        self.host.wake_all(t)

    def _to_all(self, kind: PassKind, a: Action) -> None:
        for q in self.ready[kind]:
            q.append(a)
