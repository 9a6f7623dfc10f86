"""Simulate a schedule under the engine's semantics: timeline, bubble rate, memory, deadlocks.

Semantics (the ones the engine implements; see docs/schedules.md):
  * each rank executes its list in order, one action at a time;
  * a compute pass starts when the rank is free and every collective it waits for has completed;
  * SEND/RECV are blocking rendezvous: both sides wait for each other, then both spend `p2p` seconds;
  * a collective issue does not block (the rank moves on after `issue` seconds) unless it needs an
    earlier collective's result first (SUM after MAX, DXHAT after STATS, the loss rank's G_BCAST
    after the statistics), in which case it waits for that completion; the collective completes
    `collective[kind]` seconds after the last rank issued it;
  * interlaced: every issue blocks until its collective completes (the pipeline stops together).
Deadlock freedom under these rules does not depend on the costs (every wait is for an event that
either happens or not, whatever the durations), so a run with any costs proves it for all.

The run is O(actions): every rank advances until it must wait, and is resumed by the event it
waits for.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vptrain.schedule.ir import Action, PassKind, Schedule, ScheduleError
from vptrain.schedule.memory import VocabBufferSizes, vocab_live_bytes
from vptrain.schedule.nogc import paused_gc
from vptrain.schedule.rules import ScheduleRules

K = PassKind
COMPUTE_KINDS = tuple(k for k in PassKind if k.is_compute)


@dataclass(frozen=True)
class PassCosts:
    """Seconds per action. `compute[rank][(kind, chunk)]` for compute passes (missing: 0),
    `p2p` per transfer, `collective[kind]` from the last issue to completion, `issue[kind]` the
    issuing rank's own time (e.g. the tiny exp/sum before SUM). `activation[rank][chunk]` weighs one
    in-flight microbatch-chunk (e.g. its activation bytes) for `SimResult.peak_activation`;
    `weight_grad_inputs[rank][chunk]` is what a split backward adds from B to W (the output gradients
    of the chunk's weight operations, kept for W; the activations themselves live until W);
    `vocab_buffers[rank]` sizes the vocabulary buffers for `SimResult.peak_vocab_bytes`."""

    compute: tuple[dict[tuple[PassKind, int], float], ...]
    p2p: float = 0.0
    collective: dict[PassKind, float] = field(default_factory=dict)
    issue: dict[PassKind, float] = field(default_factory=dict)
    activation: tuple[tuple[float, ...], ...] | None = None
    vocab_buffers: tuple[VocabBufferSizes, ...] | None = None
    weight_grad_inputs: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def uniform(
        cls,
        p: int,
        chunks: int = 1,
        *,
        f: float = 1.0,
        b: float = 1.0,
        w: float = 0.0,
        s: float = 0.0,
        t: float = 0.0,
        input_f: float = 0.0,
        input_b: float = 0.0,
        p2p: float = 0.0,
        collective: float = 0.0,
    ) -> PassCosts:
        table = {(K.S, 0): s, (K.T, 0): t, (K.IF, 0): input_f, (K.IB, 0): input_b}
        for c in range(chunks):
            table.update({(K.F, c): f, (K.B, c): b, (K.W, c): w})
        return cls(
            compute=tuple(dict(table) for _ in range(p)),
            p2p=p2p,
            collective={k: collective for k in PassKind if k.is_collective},
        )

    def duration(self, rank: int, a: Action) -> float:
        if a.kind.is_compute:
            return self.compute[rank].get((a.kind, a.chunk), 0.0)
        if a.kind.is_p2p:
            return self.p2p
        return self.issue.get(a.kind, 0.0)


@dataclass(frozen=True)
class SimResult:
    start: tuple[tuple[float, ...], ...]
    """start[rank][n]: when the n-th action of that rank started (a wait for a peer is not included)."""
    end: tuple[tuple[float, ...], ...]
    completion: dict[tuple[PassKind, int], float]
    makespan: float
    busy: tuple[float, ...]
    """Seconds each rank spent in compute passes."""
    peak_in_flight: tuple[int, ...]
    """Most microbatch-chunks whose F had started and whose B (W, where the backward is split) had
    not finished, per rank."""
    peak_activation: tuple[float, ...]
    """Like peak_in_flight, weighted by PassCosts.activation (equal to it without weights)."""
    peak_vocab_in_flight: tuple[int, ...]
    """Most microbatches whose S had started and whose T had not finished (fp32 softmax held)."""
    peak_vocab_bytes: tuple[int, ...] = ()
    """Most bytes of vocabulary buffers alive after any action, per rank (memory.py; needs
    PassCosts.vocab_buffers, else empty)."""

    @property
    def bubble_rate(self) -> float:
        """Idle fraction of all ranks' time: 1 - total busy / (p * makespan)."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


class DeadlockError(ScheduleError):
    """The schedule cannot finish: the message shows the grid and who waits on whom."""


def memory_profile(s: Schedule, costs: PassCosts | None = None) -> tuple[list[int], list[float], list[int]]:
    """Peak in-flight microbatch-chunks, weighted peak, and peak S-to-T microbatches per rank.
    These depend only on each rank's order, not on time.

    A microbatch-chunk's activations are alive from its F to its B, or to its W where the schedule
    splits the backward (W's weight gradients read them); from B to W it also holds
    `costs.weight_grad_inputs`."""
    peaks, weighted, vocab = [], [], []
    for rank, row in enumerate(s.ranks):
        weights = costs.activation[rank] if costs is not None and costs.activation else None
        extra = costs.weight_grad_inputs[rank] if costs is not None and costs.weight_grad_inputs else None
        split = {(a.microbatch, a.chunk) for a in row if a.kind is K.W}
        count = best = held_vocab = best_vocab = 0
        load = best_load = 0.0
        for a in row:
            kind = a.kind
            if kind is K.F:
                count += 1
                load += weights[a.chunk] if weights else 1.0
                best, best_load = max(best, count), max(best_load, load)
            elif kind is K.B:
                if (a.microbatch, a.chunk) in split:
                    load += extra[a.chunk] if extra else 0.0
                    best_load = max(best_load, load)
                else:
                    count -= 1
                    load -= weights[a.chunk] if weights else 1.0
            elif kind is K.W:
                count -= 1
                load -= (weights[a.chunk] if weights else 1.0) + (extra[a.chunk] if extra else 0.0)
            elif kind is K.S:
                held_vocab += 1
                best_vocab = max(best_vocab, held_vocab)
            elif kind is K.T:
                held_vocab -= 1
        peaks.append(best)
        weighted.append(best_load)
        vocab.append(best_vocab)
    return peaks, weighted, vocab


def simulate(s: Schedule, costs: PassCosts, *, rules: ScheduleRules | None = None) -> SimResult:
    """Run the schedule on `costs`. Raises DeadlockError if some rank can never finish."""
    with paused_gc():
        rules = rules or ScheduleRules.of(method=s.method, name=s.name, p=s.p, chunks=s.chunks)
        return _Simulation(s, costs, rules).run()


class _Simulation:
    def __init__(self, s: Schedule, costs: PassCosts, rules: ScheduleRules):
        self.s, self.costs, self.rules = s, costs, rules
        self.blocking = self.rules.method.blocking
        self.needs = [[self.rules.needs(r, a) for a in row] for r, row in enumerate(s.ranks)]
        self.pos = [0] * s.p
        self.clock = [0.0] * s.p
        self.start = [[0.0] * len(row) for row in s.ranks]
        self.end = [[0.0] * len(row) for row in s.ranks]
        self.busy = [0.0] * s.p
        # Collectives match by position, as NCCL/gloo match them: the k-th issue of every rank
        # forms collective k, and a rank that issues something else there hangs the group.
        self.issued_count = [0] * s.p
        self.groups: list[list[tuple[int, Action, float]]] = []
        self.group_of: dict[tuple[PassKind, int], int] = {}
        self.completion: dict[tuple[PassKind, int], float] = {}
        self.waiting_on: dict[tuple[PassKind, int], list[int]] = {}
        self.rendezvous: dict[tuple[int, Action], tuple[int, float]] = {}
        self.issue_time: dict[tuple[int, int], float] = {}
        self.blocked: dict[int, str] = {}
        self.work: deque[int] = deque(range(s.p))

    def run(self) -> SimResult:
        while self.work:
            self._advance(self.work.popleft())
        stuck = [r for r in range(self.s.p) if self.pos[r] < len(self.s.ranks[r])]
        if stuck:
            raise DeadlockError(self._deadlock_message(stuck))
        peaks, weighted, vocab = memory_profile(self.s, self.costs)
        return SimResult(
            start=tuple(tuple(x) for x in self.start),
            end=tuple(tuple(x) for x in self.end),
            completion=dict(self.completion),
            makespan=max(self.clock, default=0.0),
            busy=tuple(self.busy),
            peak_in_flight=tuple(peaks),
            peak_activation=tuple(weighted),
            peak_vocab_in_flight=tuple(vocab),
            peak_vocab_bytes=self._peak_vocab_bytes(),
        )

    def _peak_vocab_bytes(self) -> tuple[int, ...]:
        if self.costs.vocab_buffers is None:
            return ()
        live = vocab_live_bytes(self.s, self.costs.vocab_buffers, self.rules)
        return tuple(max(row, default=0) for row in live)

    def _wait_for(self, r: int, key: tuple[PassKind, int], why: str) -> None:
        self.waiting_on.setdefault(key, []).append(r)
        self.blocked[r] = why

    def _advance(self, r: int) -> None:
        row, row_needs, pos, clock = self.s.ranks[r], self.needs[r], self.pos, self.clock
        completion, start, end = self.completion, self.start[r], self.end[r]
        compute = self.costs.compute[r]
        size = len(row)
        while pos[r] < size:
            n = pos[r]
            a, needs = row[n], row_needs[n]
            ready = clock[r]
            for w in needs.waits:
                key = (w.kind, w.microbatch)
                done = completion.get(key)
                if done is None:
                    self._wait_for(r, key, f"waits for {w} to complete")
                    return
                ready = max(ready, done)
            kind = a.kind
            if kind.is_compute:  # inline PassCosts.duration: the bulk of every schedule
                finish = ready + compute.get((kind, a.chunk), 0.0)
                start[n], end[n] = ready, finish
                self.busy[r] += finish - ready
                clock[r] = finish
            elif kind.is_p2p:
                if not self._rendezvous(r, n, a, needs.peer, ready):
                    return
                continue
            elif not self._collective(r, n, a, ready):
                return
            pos[r] += 1
        self.blocked.pop(r, None)

    def _collective(self, r: int, n: int, a: Action, ready: float) -> bool:
        """Issue `a` (once); under blocking semantics also wait for its completion. True: done."""
        key = (a.kind, a.microbatch)
        if (r, n) not in self.issue_time:
            self.issue_time[(r, n)] = ready
            self._issue(r, n, a, ready)
        issued_at = self.issue_time[(r, n)]
        self.start[r][n] = issued_at
        finish = issued_at + self.costs.duration(r, a)
        if self.blocking:
            if key not in self.completion:
                self._wait_for(r, key, f"waits for {a} to complete (interlaced collectives block)")
                return False
            finish = max(finish, self.completion[key])
        self.end[r][n] = finish
        self.clock[r] = finish
        return True

    def _issue(self, r: int, n: int, a: Action, t: float) -> None:
        k = self.issued_count[r]
        self.issued_count[r] += 1
        if k == len(self.groups):
            self.groups.append([])
            self.group_of[(a.kind, a.microbatch)] = k
        group = self.groups[k]
        if group and group[0][1] != a:
            first_rank, first, _ = group[0]
            raise DeadlockError(
                f"collective #{k} is {first} on rank {first_rank} but {a} on rank {r}: mismatched collectives "
                "hang\n" + _render_marked(self.s, {(first_rank, self.s.ranks[first_rank].index(first)), (r, n)})
            )
        group.append((r, a, t))
        if len(group) == self.s.p:
            key = (a.kind, a.microbatch)
            self.completion[key] = max(x[2] for x in group) + self.costs.collective.get(a.kind, 0.0)
            for waiter in self.waiting_on.pop(key, []):
                self.blocked.pop(waiter, None)
                self.work.append(waiter)

    def _rendezvous(self, r: int, n: int, a: Action, peer: tuple[int, Action] | None, ready: float) -> bool:
        assert peer is not None
        peer_rank, peer_action = peer
        sender = (r, a) if a.kind in (K.SEND_F, K.SEND_B) else (peer_rank, peer_action)
        other = self.rendezvous.pop(sender, None)
        if other is None:
            self.rendezvous[sender] = (r, ready)
            self.blocked[r] = f"waits for rank {peer_rank} to reach {peer_action}"
            return False
        peer_n = self.pos[peer_rank]
        begin = max(ready, other[1])
        finish = begin + self.costs.p2p
        for rank, index in ((r, n), (peer_rank, peer_n)):
            self.start[rank][index] = begin
            self.end[rank][index] = finish
            self.clock[rank] = finish
            self.pos[rank] += 1
        self.blocked.pop(peer_rank, None)
        self.work.append(peer_rank)
        return True

    def _deadlock_message(self, stuck: list[int]) -> str:
        lines = [f"deadlock: {len(stuck)} of {self.s.p} ranks cannot finish"]
        for r in stuck:
            n = self.pos[r]
            a, why = self.s.ranks[r][n], self.blocked.get(r, "is blocked")
            peer = self.needs[r][n].peer
            if peer is not None:
                peer_row = self.s.ranks[peer[0]]
                at = peer_row[self.pos[peer[0]]] if self.pos[peer[0]] < len(peer_row) else "its end"
                why += f" (rank {peer[0]} is at {at})"
            key = next((k for k, ranks in self.waiting_on.items() if r in ranks), None)
            if key is not None:
                k = self.group_of.get(key)
                missing = [q for q in range(self.s.p) if k is None or self.issued_count[q] <= k]
                why += f"; ranks {missing} have not issued {Action(*key)}"
            lines.append(f"  rank {r} at position {n} ({a}) {why}")
        marks = {(r, self.pos[r]) for r in stuck}
        return "\n".join(lines) + "\n" + _render_marked(self.s, marks)


def _render_marked(s: Schedule, marks: set[tuple[int, int]]) -> str:
    from vptrain.schedule.render import render_order  # render imports this module

    return render_order(s, marks=marks)
