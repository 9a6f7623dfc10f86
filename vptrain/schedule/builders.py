"""Schedule builders: pure functions of integers.

    build_schedule("vocab-2", "1f1b", p=4, m=8) -> Schedule

Each builder fixes the F/B order of every rank (1F1B with a method-dependent warm-up, or the V-Half
building block), `planner.py` + `vocab.py` place the vocabulary passes, collectives and transfers on
a nominal timeline, and `lower.py` turns that into per-rank action lists with explicit
communication. Callers validate the result (`validate_schedule`).

Activation memory (microbatch-chunks whose F ran and whose B has not, peak on the first rank):

    1f1b  baseline/redis  p        vocab-2  p+1      vocab-1  p+2
          vocab-naive     p+2      interlaced  2p-1
    vhalf two chunks of half a stage per rank, balanced within 2 chunks: p chunks or fewer at
          p = 8..16, about half of 1F1B's first stage (plus, in bytes, the output gradients B
          keeps for W); a vocabulary method's delay for its chain (vhalf_delays) adds 0 to 2
          chunks per rank, where it shortens the plan.

Every builder accepts any m >= 1 (a short pipeline simply never reaches its steady state).
"""

from __future__ import annotations

import dataclasses

from vptrain.schedule.interlaced import add_input_steps, interlaced_order, interlaced_warmup
from vptrain.schedule.ir import SCHEDULE_NAMES, Action, PassKind, Schedule
from vptrain.schedule.kinds import schedule_kind
from vptrain.schedule.lower import lower
from vptrain.schedule.planner import NominalCosts, NominalPlan, plan_nominal
from vptrain.schedule.rules import METHOD_NAMES, ScheduleRules, StageMap, method_rules
from vptrain.schedule.vhalf_block import vhalf_block

K = PassKind


def one_f_one_b_order(m: int, in_flight: int) -> list[Action]:
    """One rank's 1F1B order with at most `in_flight` microbatches between their F and their B."""
    warmup = min(max(in_flight - 1, 0), m)
    order = [Action(K.F, i) for i in range(warmup)]  # warm-up: fill the pipeline
    for i in range(m - warmup):  # steady state: one forward, one backward
        order += [Action(K.F, warmup + i), Action(K.B, i)]
    order += [Action(K.B, i) for i in range(m - warmup, m)]  # cool-down: drain it
    return order


def one_f_one_b_in_flight(method: str, p: int, rank: int) -> int:
    """Peak in-flight microbatches of `rank` (plain 1F1B: p - rank)."""
    if method == "interlaced":
        # Steps aligned across ranks under blocking p2p: a forward and a backward each advance
        # one stage per period (interlaced.py; the reference's 1.5p needs non-blocking sends).
        return 2 * interlaced_warmup(p, rank) - 1
    return p - rank + ScheduleRules.of(method=method, name="1f1b", p=p).method.extra_in_flight


def interleaved_order(p: int, m: int, v: int, rank: int, extra: int = 0) -> list[Action]:
    """Rank `rank`'s F/B order in Megatron's interleaved 1F1B (Narayanan et al. 2021), v chunks per
    rank. Forwards go in rounds of p microbatches: microbatches kp..kp+p-1 through chunk 0, then the
    same p through chunk 1, ... chunk v-1, then the next p; backwards the same rounds with the chunks
    reversed. The rank warms up with 2(p - rank - 1) + (v - 1)p forwards (+ `extra`, the
    vocabulary methods' longer chain to the loss stage's B), then alternates F and B, then drains.
    Needs m a multiple of p (validate.py refuses the rest)."""
    total = m * v

    def forward(k: int) -> Action:
        return Action(K.F, (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> Action:
        return Action(K.B, (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    warmup = min(2 * (p - rank - 1) + (v - 1) * p + extra, total)
    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def vhalf_vocab_units(rules: ScheduleRules, nominal: NominalCosts) -> int:
    """How many chunk forwards the vocabulary passes S and T of one microbatch take on a rank."""
    if not rules.method.vocab:
        return 0
    return round(nominal.s / nominal.f) + round(nominal.t / nominal.f)


def vhalf_order(p: int, m: int, rank: int, delay: int, vocab: int = 0) -> list[Action]:
    """Rank `rank`'s F/B/W order: every microbatch's building block (vhalf_block.py) laid out one
    period after the previous one's, sorted by time (no two passes of a rank share a unit)."""
    block = vhalf_block(p, delay, vocab)
    stages = StageMap(p, "vhalf")
    timed = []
    for chunk in range(2):
        stage = stages.stage(rank, chunk)
        for i in range(m):
            for kind in (K.F, K.B, K.W):
                timed.append((i * block.period + block.start[(kind, stage)], Action(kind, i, chunk)))
    return [a for _, a in sorted(timed, key=lambda x: x[0])]


def vhalf_delays(method: str) -> tuple[int, ...]:
    """How long the loss stage's B may wait for the vocabulary chain in the V-Half block, in chunk
    forward units (the paper stretches the V-Half pattern the same way, vp_algorithms §4.4); the
    builder plans each and keeps the shortest nominal makespan (`_makespan`). With the default
    nominal costs (S and T a quarter of a forward) a scan over p = 2..16 found 3 best for vocab-1
    and vocab-2 and 4 for the naive method's extra barrier; where S and T are several chunk
    forwards long (the issue-13 goal config: S = 4.6 chunk forwards) no delay is best for vocab-2:
    its chain then hides behind the long S of the other ranks, and every unit of delay adds a
    chunk of activations on the ranks that wait."""
    rules = method_rules(method)
    if not rules.vocab:
        return (0,)
    return (0, 4) if method == "vocab-naive" else (0, 3)


def build_schedule(method: str, schedule: str, p: int, m: int, *, nominal: NominalCosts | None = None,
                   chunks: int = 0, w_reserve: str = "auto") -> Schedule:
    """The schedule of `method` on `schedule` for p pipeline ranks and m microbatches.

    method: baseline | redis | interlaced | vocab-naive | vocab-1 | vocab-2
    schedule: 1f1b | zb-h1 | vhalf | interleaved (kinds.SCHEDULE_KINDS says which methods each runs)
    `chunks`: model chunks per rank, for interleaved (0: its default, 2).
    `w_reserve`: zb-h1's W reserve for the cool-down (reserve_choices; auto: the shortest plan).
    `nominal` only changes where vocabulary passes and transfers are placed; the engine and
    `vptrain plan` both use the default so they run and report the same schedule.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"method: unknown '{method}'; choose one of {', '.join(METHOD_NAMES)}")
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule: unknown '{schedule}'; choose one of {', '.join(SCHEDULE_NAMES)}")
    if method not in schedule_kind(schedule).methods:
        raise ValueError(f"method={method} does not run on schedule={schedule}; use schedule=1f1b")
    if p < 1:
        raise ValueError(f"p={p}: a pipeline needs at least one rank")
    if m < 1:
        raise ValueError(f"m={m}: a schedule needs at least one microbatch")
    rules = ScheduleRules.of(method=method, name=schedule, p=p, chunks=chunks)
    if rules.stages.placement == "loop" and m % p:
        raise ValueError(f"m={m}: schedule={schedule} runs rounds of p={p} microbatches; use a multiple of p")
    nominal = nominal or NominalCosts()
    w_caps = None
    if method == "interlaced":  # F/B with the synchronous steps' markers (interlaced.py)
        candidates = [add_input_steps([interlaced_order(p, m, r) for r in range(p)])]
    elif schedule in ("1f1b", "zb-h1"):
        in_flight = [one_f_one_b_in_flight(method, p, r) for r in range(p)]
        candidates = [[one_f_one_b_order(m, n) for n in in_flight]]
        if schedule == "zb-h1":  # W passes fill the bubbles, never holding more than 1F1B does
            w_caps = [max(in_flight)] * p
    elif schedule == "interleaved":
        # The vocabulary chain delays only the last chunk's B: one more chunk forward of warm-up per
        # extra microbatch of 1F1B's rule. At the issue-13 goal size (p=4, m=16, v=2) that beats v
        # per microbatch (vocab-2 bubble 0.69x of 1F1B's against 0.73x, vocab-1 0.73x against 0.83x).
        extra = rules.method.extra_in_flight
        candidates = [[interleaved_order(p, m, rules.stages.chunks, r, extra) for r in range(p)]]
    else:
        vocab = vhalf_vocab_units(rules, nominal)
        candidates = [[vhalf_order(p, m, r, delay, vocab) for r in range(p)] for delay in vhalf_delays(method)]
    if rules.split_backward and nominal.w <= 0:  # B's share of a whole backward: the input gradient
        nominal = dataclasses.replace(nominal, b=nominal.b / 2, w=nominal.b / 2)
    if not rules.method.vocab or rules.method.blocking:
        # Communication costs only steer the overlapped vocabulary methods' placement (vocab.py).
        nominal = nominal.without_communication()
    if method == "interlaced":
        # The first step runs the input layers of the whole warm-up at once.
        nominal = dataclasses.replace(nominal, sync_first_inputs=min(interlaced_warmup(p, 0), m) + 1)
    plans = [_best_plan(rules, m, orders, nominal, w_caps, w_reserve) for orders in candidates]
    return lower(min(plans, key=_makespan), rules, m=m, method=method)


HOLD_CHOICES = (1.0, 0.0, 2.0)
"""The overlapped vocabulary methods are planned with the hold window (vocab.OverlappedVocab.hold)
at these multiples of the nominal one, and the first shortest nominal makespan wins: whether a short
idle for the vocabulary chain pays depends on the pass and communication ratios (on the cpu profile
vocab-2 at p=12, m=96 wants it, vocab-1 at p=2, m=2, V=4k needs it, p=32, m=8p does as well
without), so no one constant serves every config. Deterministic: the planner and every trainer rank
pick the same plan. (Also choosing between planning with and without the communication costs, by
a simulation on the nominal costs, cost twice the time and moved no figure by more than 0.15 point.)"""


W_RESERVE_CHOICES: tuple[int | str, ...] = (0, 1, 2, 3, "by-rank")
"""ZB-H1's W fillers (planner.Planner) are planned keeping 0, 1, 2 or 3 W on every rank, or r W
on rank r ("by-rank"), in reserve through idle moments for the cool-down; the shortest nominal
makespan wins, as with HOLD_CHOICES. By rank fits the cool-down's shape: the last microbatch's B
walks from rank p-1 down to rank 0, so rank r runs out of B's about r B's before rank 0 does and
needs about r W's to stay busy to the end (never more alive than the cap). At the issue-13 goal
config (p=4, m=16, vocab-2) no reserve gives 0.83x of 1F1B's bubble, a reserve of 2 0.74x, by rank
0.47x; it shortens the baseline's plans too (p = 3..8). The later ranks then hold more bytes (more
of their chunks wait for W with B's kept gradients): `schedule.w_reserve` pins one choice."""


def w_reserves(choice: int | str, p: int) -> tuple[int, ...]:
    """Per-rank W reserve of a W_RESERVE_CHOICES entry."""
    return tuple(range(p)) if choice == "by-rank" else (int(choice),) * p


def reserve_choices(setting: str) -> tuple[int | str, ...]:
    """The W_RESERVE_CHOICES entries `schedule.w_reserve` plans: all for auto, else the one it names
    (ValueError naming the key if it names none)."""
    if setting == "auto":
        return W_RESERVE_CHOICES
    named = tuple(c for c in W_RESERVE_CHOICES if str(c) == setting)
    if not named:
        known = ", ".join(["auto", *map(str, W_RESERVE_CHOICES)])
        raise ValueError(f"schedule.w_reserve: '{setting}' is not a choice; use one of {known}")
    return named


def _best_plan(rules: ScheduleRules, m: int, orders: list[list[Action]], nominal: NominalCosts,
               w_caps: list[int] | None = None, w_reserve: str = "auto") -> NominalPlan:
    holds = (1.0,)
    if K.STATS in rules.method.collectives and not rules.method.blocking and nominal.hold_window > 0:
        holds = HOLD_CHOICES
    p = rules.stages.p
    reserves = [w_reserves(c, p) for c in reserve_choices(w_reserve)] if w_caps is not None else [None]
    plans = [plan_nominal(rules, m, orders, dataclasses.replace(nominal, hold_window=nominal.hold_window * k),
                          w_caps, reserve) for k in holds for reserve in reserves]
    return min(plans, key=_makespan)


def _makespan(plan: NominalPlan) -> float:
    """The nominal plan's length; `min` keeps the first of equal ones (the candidates' order)."""
    return max(row[-1][2] for row in plan.computes if row)
