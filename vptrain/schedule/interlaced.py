"""The interlaced baseline: its per-rank order and its synchronous vocabulary steps (planner.py).

Every microbatch's output layer runs synchronously on the whole pipeline (X_BCAST S MAX SUM
G_BCAST T DX_REDUCE, blocking), so the ranks must arrive at each of these steps together or wait
for each other. The order makes them arrive together (every transfer a blocking rendezvous, as
the engine runs them). With lead = p - 1 - r, rank r runs

    IN0  F0 .. F(lead)  Y0  |  for k = 1..m-1:  B(k-1-lead)  F(k+lead)  Yk  |  remaining Bs  IN1

(indices outside 0..m-1 skipped). Every rank's warm-up of p - r forwards ends at the same moment
(as in 1F1B); then each period is B, F, then the output step Yk of the microbatch whose forward
has just reached the last stage, on every rank at once. A transfer can only happen where both
neighbours are between passes; inside a period a rank's boundaries fall after its B and after its F,
the same on every rank, so gradients move right after the Bs and activations at the period's end:
a forward and a backward each advance one stage per period, and stage r keeps 2(p - r) - 1
microbatches in flight. With free vocabulary passes and communication the makespan is plain
1F1B's; with real costs it adds only the steps' passes and collectives.

The reference (vp_algorithms §5) warms up floor(1.5p) - r and keeps 1.5p in flight: its ranks
alternate F-then-B and B-then-F so that a forward advances two stages per period, which needs the
activation sent non-blocking while the sender runs its B. Under blocking p2p the F-then-B rank and
its B-then-F neighbour share no moment between passes inside a period, and that order stalls one
forward per period (about 1.5x the 1F1B makespan at p = 8..32).

The input layers ride along: IF/EMB_REDUCE of the whole warm-up in one step before it starts, then
at each step the IFs stage 0 will need next and the DEMB_BCAST/IB of stage 0's finished backwards;
one input step at the end takes those of the cool-down.

In the order a step is a marker action: X_BCAST(j) for microbatch j's output step, DEMB_BCAST(k)
for the k-th input-only step. InterlacedVocab runs step k once every rank has reached its k-th
marker; which IF/IB it carries is decided then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vptrain.schedule.ir import Action, PassKind
from vptrain.schedule.vocab import NoVocab

if TYPE_CHECKING:
    from vptrain.schedule.planner import Planner

K = PassKind
OUTPUT_STEP = (K.X_BCAST, K.S, K.MAX, K.SUM, K.G_BCAST, K.T, K.DX_REDUCE)
OUTPUT_MARK, INPUT_MARK = K.X_BCAST, K.DEMB_BCAST


def interlaced_warmup(p: int, rank: int) -> int:
    """Forwards rank `rank` runs before the first output step (as plain 1F1B: p - rank)."""
    return p - rank


def interlaced_order(p: int, m: int, rank: int) -> list[Action]:
    """Rank `rank`'s F/B order with its synchronous-step markers (see the module docstring)."""
    lead = p - 1 - rank  # periods a forward needs from this rank to the loss stage, and a backward back
    order = [Action(INPUT_MARK, 0)]  # the warm-up's input layers
    order += [Action(K.F, i) for i in range(min(lead + 1, m))]
    order.append(Action(OUTPUT_MARK, 0))
    for k in range(1, m):
        if k - 1 - lead >= 0:
            order.append(Action(K.B, k - 1 - lead))
        if k + lead < m:
            order.append(Action(K.F, k + lead))
        order.append(Action(OUTPUT_MARK, k))
    order += [Action(K.B, i) for i in range(max(0, m - 1 - lead), m)]
    return order


def add_input_steps(orders: list[list[Action]]) -> list[list[Action]]:
    """Close every order with one input-only step for stage 0's backwards after the last output
    step. (One step after each of them would keep rank 0 inside a step while rank 1 still has the
    gradients of the next ones to send, and the cool-down would run one backward at a time.)"""
    return [row + [Action(INPUT_MARK, 1)] for row in orders]


@dataclass
class _Step:
    output: int | None
    """Microbatch whose output layer this step runs (None: input layers only)."""
    joined: int = 0


class InterlacedVocab(NoVocab):
    def __init__(self, host: Planner):
        super().__init__(host)
        self.steps: list[_Step] = []
        self.next_step = [0] * host.p
        self.waiting = [False] * host.p
        """Rank is inside a step, waiting for the others (it can take no transfer then)."""
        self.inputs_due: list[int] = []
        self.grads_due: list[int] = []
        self.released_inputs = -1

    def start(self) -> None:
        # The first step runs the input layers of the whole warm-up.
        self.release_inputs(max(self.host.costs.sync_first_inputs, 1) - 1, 0.0)

    def release_inputs(self, upto: int, t: float) -> None:
        for j in range(self.released_inputs + 1, min(upto, self.host.m - 1) + 1):
            self.inputs_due.append(j)
            self.released_inputs = j

    def started(self, r: int, a: Action, t: float) -> None:
        if a.kind is K.F and (r, a.chunk) == self.host.rules.stages.embed_place:
            self.release_inputs(a.microbatch + self.host.costs.if_lookahead + 1, t)

    def finished(self, r: int, a: Action, t: float) -> None:
        if a.kind is K.B and self.host.rules.stages.prev_place(r, a.chunk) is None:
            self.grads_due.append(a.microbatch)

    def input_ready(self, i: int) -> bool:
        return (K.EMB_REDUCE, i) in self.host.plan.completion

    def loss_grad_ready(self, i: int) -> bool:
        return (K.DX_REDUCE, i) in self.host.plan.completion

    def join(self, r: int, t: float) -> bool:
        """At a step marker, rank r enters its next step (True); the last rank to enter runs it.
        Every rank meets the steps in the same order, so none can wait in a different one. A rank
        first finishes its transfers with a neighbour that is computing (as its blocking send would),
        but not with one that waits inside a step: that transfer happens after the step."""
        host = self.host
        order = host.orders[r]
        if host.pos[r] >= len(order) or order[host.pos[r]].kind not in (OUTPUT_MARK, INPUT_MARK):
            return False
        if self._transfer_pending(r):
            return True  # idle until the neighbour's pass ends and the transfer wakes us
        mark = order[host.pos[r]]
        host.pos[r] += 1
        k = self.next_step[r]
        self.next_step[r] += 1
        if k == len(self.steps):
            self.steps.append(_Step(mark.microbatch if mark.kind is OUTPUT_MARK else None))
        step = self.steps[k]
        expected = mark.microbatch if mark.kind is OUTPUT_MARK else None
        if step.output != expected:
            raise AssertionError(f"rank {r} reaches step {mark} where others run step {k} (builder bug)")
        step.joined += 1
        host.busy[r] = self.waiting[r] = True
        if step.joined == host.p:
            self._run(step, t)
        else:
            host.wake_all(t)  # a neighbour idling for a transfer with r now enters its step too
        return True

    def hold(self, r: int, t: float) -> bool:
        """Before an F/B, finish a transfer with a neighbour whose pass ends at this same moment
        (as the rank's blocking send or receive would): otherwise a tie in event order could push
        the transfer behind the next pass of both, and the cool-down's backwards would wait on it."""
        return self._transfer_pending(r, ending_at=t)

    def _transfer_pending(self, r: int, ending_at: float | None = None) -> bool:
        host = self.host
        peers = [dest for _, dest, _ in host.outbox[r]] + [src for src, _, _ in host.inbox[r]]
        def computing(q: int) -> bool:
            if not host.busy[q] or self.waiting[q]:
                return False
            return ending_at is None or abs(host.plan.computes[q][-1][2] - ending_at) <= 1e-9

        return any(computing(q) for q in peers)

    def _run(self, step: _Step, t: float) -> None:
        # Every rank runs the same actions with the same nominal costs, so their times coincide.
        actions = tuple(Action(k, step.output) for k in OUTPUT_STEP) if step.output is not None else ()
        actions += tuple(Action(k, j) for j in self.inputs_due for k in (K.IF, K.EMB_REDUCE))
        actions += tuple(Action(k, j) for j in self.grads_due for k in (K.DEMB_BCAST, K.IB))
        self.inputs_due, self.grads_due = [], []
        plan = self.host.plan
        for r in range(self.host.p):
            now = t
            for a in actions:
                if a.kind.is_collective:
                    plan.issues.setdefault((a.kind, a.microbatch), {})[r] = now
                    plan.completion[(a.kind, a.microbatch)] = now
                    continue
                end = now + self.host.cost[a.kind]
                plan.computes[r].append((a, now, end))
                now = end
            self.waiting[r] = False
            self.host.release_at(r, now)
