"""The V-Half building block with the backward split into B and W (vp_algorithms §4.1, after Qi et
al. 2024, "Pipeline Parallelism with Controllable Memory").

A building block is one microbatch's passes laid out on every rank; the schedule repeats it every
`period` units, so a rank's steady state runs each of its passes once per period and keeps

    (sum of its microbatch-chunks' lifespans, F start to W end) / period

of them alive. Time unit: one chunk pass (F = B = W = 1), so a rank does 2 F + 2 B + 2 W = 6 units
per microbatch and the period is 6 (no bubble in the steady state).

Placement, one microbatch, stage s on its rank (`StageMap(p, "vhalf")`):
  * F of stages 0 .. 2p-1, each at the earliest unit after its predecessor whose slot (time mod
    period) is free on its rank: a straight chain down the V and back up;
  * `delay` units after the last F (the vocabulary chain X_BCAST -> S -> statistics -> the loss
    gradient; 0 without one), B of stages 2p-1 .. 0 the same way;
  * each rank's two W in its two remaining slots, choosing which W takes which slot so that the
    rank keeps the fewest microbatch-chunks alive (then the shortest lifespans).
At p = 4 the chain never collides, and a rank keeps 4 chunks (3 + W's unit, 5 with the vocabulary
delay of 3): half of 1F1B's first stage, whose p (p + 1) microbatches are two chunks each.
Without the split (a whole backward of 2 units right after the chain) V-Half kept about 0.7x.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations

from vptrain.schedule.ir import PassKind
from vptrain.schedule.rules import StageMap

K = PassKind
PERIOD = 6
"""Units per microbatch on every rank: 2 chunks x (F + B + W), one unit each."""


@dataclass(frozen=True)
class VHalfBlock:
    p: int
    delay: int
    period: int
    start: dict[tuple[PassKind, int], int]
    """(F | B | W, stage) -> start unit of that pass of microbatch 0 (microbatch i: + i * period)."""

    def lifespans(self, rank: int) -> list[tuple[int, int]]:
        """(F start, W end) of the rank's two microbatch-chunks, chunk 0 first."""
        stages = StageMap(self.p, "vhalf")
        return [(self.start[(K.F, s)], self.start[(K.W, s)] + 1) for s in (stages.stage(rank, c) for c in (0, 1))]

    def peak_alive(self, rank: int) -> int:
        """Most microbatch-chunks alive (F started, W not finished) on `rank` in the steady state."""
        return _steady_peak(self.lifespans(rank), self.period)


@lru_cache(maxsize=64)  # every rank's order asks for the same block
def vhalf_block(p: int, delay: int, vocab: int = 0, *, slack: int = 3, max_nodes: int = 20000) -> VHalfBlock:
    """The block for p ranks with the loss stage's B at least `delay` units after the last F and
    `vocab` units of vocabulary passes (S, T) on every rank right after the last F (module doc).

    A depth-first search over the chain (module doc): each pass at the earliest free unit after its
    predecessor or up to `slack` units later in all (a late pass can free the slot right after a B
    for its W). A rank's W are placed once its last B is, and a branch whose ranks already keep more
    chunks alive than the best block found is cut. Best: fewest chunks alive on the fullest rank,
    then the shortest block, then the shortest lifespans. The straight chain (no slack) is the first
    leaf, so `max_nodes` (a bound on the search's time) only ever improves on it. Deterministic."""
    period = PERIOD + vocab
    best = None
    for window in range(period) if vocab else (None,):
        search = _Search(p, delay, slack, max_nodes, period, vocab, window)
        search.run()
        if search.best is not None and (best is None or search.best[0] < best[0]):
            best = search.best
    assert best is not None
    return VHalfBlock(p, delay, period, best[1])


class _Search:
    """`window`: the residue (time mod period) where the vocabulary passes start on every rank (the
    last F must end there); None without vocabulary units."""

    def __init__(self, p: int, delay: int, slack: int, max_nodes: int, period: int, vocab: int,
                 window: int | None):
        self.p, self.delay, self.slack, self.max_nodes = p, delay, slack, max_nodes
        self.period, self.vocab, self.window = period, vocab, window
        stages = StageMap(p, "vhalf")
        self.chain = [(K.F, s) for s in range(2 * p)] + [(K.B, s) for s in reversed(range(2 * p))]
        self.rank_of = [stages.place(s)[0] for _, s in self.chain]
        self.mine = [[stages.stage(r, c) for c in (0, 1)] for r in range(p)]
        blocked = {(window + k) % period for k in range(vocab)} if window is not None else set()
        self.used: list[set[int]] = [set(blocked) for _ in range(p)]
        self.start: dict[tuple[PassKind, int], int] = {}
        self.w: dict[int, dict[tuple[PassKind, int], int]] = {}
        self.peaks: list[int] = []
        self.best: tuple[tuple[int, int, int], dict] | None = None
        self.nodes = 0

    def run(self, n: int = 0, t: int = 0, spare: int | None = None) -> None:
        spare = self.slack if spare is None else spare
        if n == len(self.chain):
            self._leaf()
            return
        kind, stage = self.chain[n]
        rank, period, used = self.rank_of[n], self.period, self.used[self.rank_of[n]]
        last_f = kind is K.F and stage == 2 * self.p - 1
        if kind is K.B and stage == 2 * self.p - 1:
            t += self.vocab + self.delay
        while t % period in used:
            t += 1
        for extra in range(spare + 1 if not last_f else period + spare + 1):
            self.nodes += 1
            if self.nodes > self.max_nodes and self.best is not None:
                return
            at = t + extra
            if at % period in used:
                continue
            if last_f and self.window is not None:
                if (at + 1) % period != self.window:
                    continue  # the vocabulary passes follow the last F at once
                if at - t > spare:
                    return
            used.add(at % period)
            self.start[(kind, stage)] = at
            if kind is K.B and stage == rank:  # the rank's last pass of the chain: place its W
                free = [slot for slot in range(period) if slot not in used]
                self.w[rank] = _place_w(self.mine[rank], free, self.start, period)
                spans = [(self.start[(K.F, s)], self.w[rank][(K.W, s)] + 1) for s in self.mine[rank]]
                self.peaks.append(_steady_peak(spans, period))
                if self.best is None or max(self.peaks) <= self.best[0][0]:
                    self.run(n + 1, at + 1, spare - (at - t))
                self.peaks.pop()
            else:
                self.run(n + 1, at + 1, spare - (at - t))
            used.discard(at % period)
            del self.start[(kind, stage)]

    def _leaf(self) -> None:
        start = dict(self.start)
        for placed in self.w.values():
            start.update(placed)
        spans = [(start[(K.F, s)], start[(K.W, s)] + 1) for r in range(self.p) for s in self.mine[r]]
        score = (max(self.peaks), max(start.values()) + 1, sum(end - begin for begin, end in spans))
        if self.best is None or score < self.best[0]:
            self.best = (score, start)


def _place_w(mine: list[int], free: list[int], start: dict, period: int) -> dict[tuple[PassKind, int], int]:
    """Each of the rank's W at the first unit after its B in one of the free slots; the slot
    assignment that keeps the fewest chunks alive, then the shortest lifespans, wins."""
    best: tuple[tuple[int, int], dict] | None = None
    for slots in permutations(free, len(mine)):
        placed = {}
        for stage, slot in zip(mine, slots, strict=True):
            after = start[(K.B, stage)] + 1
            placed[(K.W, stage)] = after + (slot - after) % period
        spans = [(start[(K.F, s)], placed[(K.W, s)] + 1) for s in mine]
        score = (_steady_peak(spans, period), sum(end - begin for begin, end in spans))
        if best is None or score < best[0]:
            best = (score, placed)
    assert best is not None
    return best[1]


def _steady_peak(spans: list[tuple[int, int]], period: int) -> int:
    """Most intervals [begin + k*period, end + k*period) over all k that cover one unit."""
    far = max(end for _, end in spans) + period  # a unit well inside the steady state
    return max(
        sum(_covering(begin, end, t, period) for begin, end in spans) for t in range(far, far + period)
    )


def _covering(begin: int, end: int, t: int, period: int) -> int:
    """How many k have begin + k*period <= t < end + k*period."""
    return (t - begin) // period - (t - end) // period
