"""Check a schedule before anything runs it.

Rules (each failure raises `ScheduleError` with the grid and the offending cells marked):
  1. every expected pass, transfer and collective appears exactly once per rank (W exactly where
     the schedule splits the backward, never elsewhere);
  2. on each rank, everything an action needs comes before it (`ScheduleRules.needs`): F before B,
     a send after the pass that produced its data, a receive before the pass that uses it, a
     collective issued before anything waits on it, S before T, ...;
  3. any two ranks run the operations they share (the transfers between them, every collective) in
     the same relative order (order.py; NCCL hangs otherwise, whatever the communicator). This
     covers "every rank issues the collectives in one order" and "sends and receives pair up";
  4. (check_deadlock) a dry run under the engine's semantics finishes (see simulate.py).
"""

from __future__ import annotations

from collections import Counter

from vptrain.schedule.ir import SCHEDULE_NAMES, Action, PassKind, Schedule, ScheduleError
from vptrain.schedule.nogc import paused_gc
from vptrain.schedule.order import first_order_conflict
from vptrain.schedule.render import render_order
from vptrain.schedule.rules import METHOD_NAMES, ScheduleRules
from vptrain.schedule.simulate import DeadlockError, PassCosts, simulate

K = PassKind


def _fail(s: Schedule, message: str, marks: set[tuple[int, int]]) -> None:
    header = f"{s.method}/{s.name} p={s.p} m={s.num_microbatches}: {message}"
    raise ScheduleError(header + "\n" + render_order(s, marks=marks))


def validate_schedule(s: Schedule, *, check_deadlock: bool = True, rules: ScheduleRules | None = None) -> None:
    """Raise ScheduleError unless `s` is safe to run (rules in the module docstring). `rules` may be
    passed to share its memo of per-action needs with a later `simulate` call."""
    if s.method not in METHOD_NAMES:
        raise ScheduleError(f"unknown method '{s.method}'; choose one of {', '.join(METHOD_NAMES)}")
    if s.name not in SCHEDULE_NAMES:
        raise ScheduleError(f"unknown schedule '{s.name}'; choose one of {', '.join(SCHEDULE_NAMES)}")
    rules = rules or ScheduleRules.of(method=s.method, name=s.name, p=s.p, chunks=s.chunks)
    if s.chunks != rules.stages.chunks or s.p < 1 or s.num_microbatches < 1:
        raise ScheduleError(
            f"metadata: {s.name} with p={s.p}, m={s.num_microbatches} needs chunks={rules.stages.chunks}, "
            f"p >= 1 and m >= 1 (got chunks={s.chunks})"
        )
    with paused_gc():  # allocation-heavy and cycle-free (nogc.py)
        positions = [_check_exactly_once(s, rules, r) for r in range(s.p)]
        for r in range(s.p):
            _check_local_order(s, rules, r, positions[r])
        conflict = first_order_conflict(s, rules)
    if conflict is not None:
        (fa, sa), (fb, sb) = conflict.positions_a, conflict.positions_b
        _fail(s, conflict.message(s), {(conflict.a, fa), (conflict.a, sa), (conflict.b, fb), (conflict.b, sb)})
    if check_deadlock:
        try:
            simulate(s, PassCosts.uniform(s.p, s.chunks, s=0.5, t=0.5, input_f=0.1, input_b=0.1), rules=rules)
        except DeadlockError as err:
            raise ScheduleError(f"{s.method}/{s.name} p={s.p} m={s.num_microbatches}: {err}") from None


def _check_exactly_once(s: Schedule, rules: ScheduleRules, r: int) -> dict[Action, int]:
    row = s.ranks[r]
    expected = Counter(rules.expected(r, s.num_microbatches))
    positions = {a: n for n, a in enumerate(row)}
    if len(positions) < len(row) or not positions.keys() <= expected.keys():  # report the first fault
        positions = {}
        for n, a in enumerate(row):
            if a in positions:
                _fail(s, f"rank {r} runs {a} twice (positions {positions[a]} and {n})", {(r, positions[a]), (r, n)})
            positions[a] = n
            if a not in expected:
                _fail(s, f"rank {r} runs {a}, which does not belong on this rank in this schedule", {(r, n)})
    missing = [a for a in expected if a not in positions]
    if missing:
        shown = ", ".join(str(a) for a in missing[:8]) + (" ..." if len(missing) > 8 else "")
        _fail(s, f"rank {r} never runs {shown}", set())
    return positions


def _check_local_order(s: Schedule, rules: ScheduleRules, r: int, positions: dict[Action, int]) -> None:
    needs, get, missing = rules.needs, positions.get, len(s.ranks[r])  # `missing`: past every position
    for n, a in enumerate(s.ranks[r]):
        found = needs(r, a)
        for before in found.after:
            if get(before, missing) > n:
                at = positions.get(before)
                where = "never" if at is None else f"only at position {at}"
                _fail(s, f"rank {r} runs {a} (position {n}) before {before} ({where})", _cells(r, n, at))
        for awaited in found.waits:
            if get(awaited, missing) > n:
                at = positions.get(awaited)
                where = "never issues it" if at is None else f"issues it only at position {at}"
                msg = f"rank {r} waits for {awaited} at {a} (position {n}) but {where}"
                _fail(s, msg, _cells(r, n, at))


def _cells(r: int, n: int, other: int | None) -> set[tuple[int, int]]:
    return {(r, n)} | ({(r, other)} if other is not None else set())
