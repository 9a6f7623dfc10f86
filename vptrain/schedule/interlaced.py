"""The interlaced baseline's vocabulary passes in the nominal timeline (planner.py).

InterlacedVocab runs them as barriers: after the loss stage's F(i), every rank stops at its next
free moment and the whole pipeline runs X_BCAST S MAX SUM G_BCAST T DX_REDUCE for microbatch i
together, plus whatever input-layer work is due (IF/EMB_REDUCE ahead of stage 0, DEMB_BCAST/IB after
it), so each microbatch costs one barrier rather than three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vptrain.schedule.ir import Action, PassKind
from vptrain.schedule.vocab import NoVocab

if TYPE_CHECKING:
    from vptrain.schedule.planner import Planner

K = PassKind
OUTPUT_BARRIER = (K.X_BCAST, K.S, K.MAX, K.SUM, K.G_BCAST, K.T, K.DX_REDUCE)


@dataclass
class _Barrier:
    actions: tuple[Action, ...]
    joined: int = 0


class InterlacedVocab(NoVocab):
    def __init__(self, host: Planner):
        super().__init__(host)
        self.barriers: list[_Barrier] = []
        self.next_barrier = [0] * host.p
        self.inputs_due: list[int] = []
        self.grads_due: list[int] = []
        self.outputs_left = host.m
        self.released_inputs = -1

    def start(self) -> None:
        # The first barrier runs the input layers of the whole warm-up.
        self.release_inputs(max(self.host.costs.sync_first_inputs, 1) - 1, 0.0)
        self._add(self._extras(), 0.0)

    def release_inputs(self, upto: int, t: float) -> None:
        for j in range(self.released_inputs + 1, min(upto, self.host.m - 1) + 1):
            self.inputs_due.append(j)
            self.released_inputs = j

    def started(self, r: int, a: Action, t: float) -> None:
        if a.kind is K.F and (r, a.chunk) == self.host.rules.stages.embed_place:
            self.release_inputs(a.microbatch + self.host.costs.if_lookahead + 1, t)

    def finished(self, r: int, a: Action, t: float) -> None:
        stages, i = self.host.rules.stages, a.microbatch
        if a.kind is K.F and stages.next_place(r, a.chunk) is None:
            self.outputs_left -= 1
            self._add(tuple(Action(k, i) for k in OUTPUT_BARRIER) + self._extras(), t)
        elif a.kind is K.B and stages.prev_place(r, a.chunk) is None:
            self.grads_due.append(i)
            if not self.outputs_left:  # no output barrier left to ride along with
                self._add(self._extras(), t)

    def input_ready(self, i: int) -> bool:
        return (K.EMB_REDUCE, i) in self.host.plan.completion

    def loss_grad_ready(self, i: int) -> bool:
        return (K.DX_REDUCE, i) in self.host.plan.completion

    def join(self, r: int, t: float) -> bool:
        """Join the oldest barrier rank r has not run; the last rank to join starts it. Every rank
        sees the barriers in the same order, so they can never wait in different ones."""
        if self.next_barrier[r] >= len(self.barriers):
            return False
        barrier = self.barriers[self.next_barrier[r]]
        self.next_barrier[r] += 1
        barrier.joined += 1
        self.host.busy[r] = True
        if barrier.joined == self.host.p:
            self._run(barrier, t)
        return True

    def _run(self, barrier: _Barrier, t: float) -> None:
        # Every rank runs the same actions with the same nominal costs, so their times coincide.
        plan = self.host.plan
        for r in range(self.host.p):
            now = t
            for a in barrier.actions:
                if a.kind.is_collective:
                    plan.issues.setdefault((a.kind, a.microbatch), {})[r] = now
                    plan.completion[(a.kind, a.microbatch)] = now
                    continue
                end = now + self.host.cost[a.kind]
                plan.computes[r].append((a, now, end))
                now = end
            self.host.release_at(r, now)

    def _extras(self) -> tuple[Action, ...]:
        extras = [Action(k, j) for j in self.inputs_due for k in (K.IF, K.EMB_REDUCE)]
        extras += [Action(k, j) for j in self.grads_due for k in (K.DEMB_BCAST, K.IB)]
        self.inputs_due, self.grads_due = [], []
        return tuple(extras)

    def _add(self, actions: tuple[Action, ...], t: float) -> None:
        if actions:
            self.barriers.append(_Barrier(actions))
            self.host.wake_all(t)
