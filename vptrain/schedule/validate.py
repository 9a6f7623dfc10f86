"""Check a schedule before anything runs it.

Rules (each failure raises `ScheduleError` with the grid and the offending cells marked):
  1. every expected pass, transfer and collective appears exactly once per rank (W optional);
  2. on each rank, everything an action needs comes before it (`ScheduleRules.needs`): F before B,
     a send after the pass that produced its data, a receive before the pass that uses it, a
     collective issued before anything waits on it, S before T, ...;
  3. every rank issues the vocabulary collectives in the same order (else the run hangs);
  4. between any two ranks, sends and receives pair up in the same order;
  5. (check_deadlock) a dry run under the engine's semantics finishes (see simulate.py).
"""

from __future__ import annotations

from collections import Counter

from vptrain.schedule.ir import SCHEDULE_NAMES, Action, PassKind, Schedule, ScheduleError
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
    rules = rules or ScheduleRules.of(method=s.method, name=s.name, p=s.p)
    if s.chunks != rules.stages.chunks or s.p < 1 or s.num_microbatches < 1:
        raise ScheduleError(
            f"metadata: {s.name} with p={s.p}, m={s.num_microbatches} needs chunks={rules.stages.chunks}, "
            f"p >= 1 and m >= 1 (got chunks={s.chunks})"
        )
    positions = [_check_exactly_once(s, rules, r) for r in range(s.p)]
    for r in range(s.p):
        _check_local_order(s, rules, r, positions[r])
    _check_collective_order(s)
    _check_p2p_pairs(s, rules)
    if check_deadlock:
        try:
            simulate(s, PassCosts.uniform(s.p, s.chunks, s=0.5, t=0.5, input_f=0.1, input_b=0.1), rules=rules)
        except DeadlockError as err:
            raise ScheduleError(f"{s.method}/{s.name} p={s.p} m={s.num_microbatches}: {err}") from None


def _check_exactly_once(s: Schedule, rules: ScheduleRules, r: int) -> dict[Action, int]:
    row = s.ranks[r]
    expected = Counter(rules.expected(r, s.num_microbatches))
    positions: dict[Action, int] = {}
    for n, a in enumerate(row):
        if a in positions:
            _fail(s, f"rank {r} runs {a} twice (positions {positions[a]} and {n})", {(r, positions[a]), (r, n)})
        positions[a] = n
        if a not in expected and not _optional(a, rules, r, s.num_microbatches):
            _fail(s, f"rank {r} runs {a}, which does not belong on this rank in this schedule", {(r, n)})
    missing = [a for a in expected if a not in positions]
    if missing:
        shown = ", ".join(str(a) for a in missing[:8]) + (" ..." if len(missing) > 8 else "")
        _fail(s, f"rank {r} never runs {shown}", set())
    return positions


def _optional(a: Action, rules: ScheduleRules, r: int, m: int) -> bool:
    """W (a split-off weight gradient) may follow any of the rank's B passes."""
    return a.kind is K.W and 0 <= a.microbatch < m and 0 <= a.chunk < rules.stages.chunks


def _check_local_order(s: Schedule, rules: ScheduleRules, r: int, positions: dict[Action, int]) -> None:
    for n, a in enumerate(s.ranks[r]):
        needs = rules.needs(r, a)
        for before in needs.after:
            at = positions.get(before)
            if at is None or at > n:
                where = "never" if at is None else f"only at position {at}"
                _fail(s, f"rank {r} runs {a} (position {n}) before {before} ({where})", _cells(r, n, at))
        for awaited in needs.waits:
            at = positions.get(awaited)
            if at is None or at > n:
                where = "never issues it" if at is None else f"issues it only at position {at}"
                msg = f"rank {r} waits for {awaited} at {a} (position {n}) but {where}"
                _fail(s, msg, _cells(r, n, at))


def _cells(r: int, n: int, other: int | None) -> set[tuple[int, int]]:
    return {(r, n)} | ({(r, other)} if other is not None else set())


def _check_collective_order(s: Schedule) -> None:
    sequences = [[(n, a) for n, a in enumerate(row) if a.kind.is_collective] for row in s.ranks]
    reference = sequences[0]
    for r in range(1, s.p):
        for k, ((n0, a0), (n, a)) in enumerate(zip(reference, sequences[r], strict=False)):
            if a0 != a:
                msg = f"collective #{k} is {a0} on rank 0 but {a} on rank {r}; every rank must issue them in one order"
                _fail(s, msg, {(0, n0), (r, n)})
        if len(sequences[r]) != len(reference):
            _fail(s, f"rank {r} issues {len(sequences[r])} collectives, rank 0 issues {len(reference)}", set())


def _check_p2p_pairs(s: Schedule, rules: ScheduleRules) -> None:
    # For each directed link a -> b: a's sends in a's order must match b's receives in b's order.
    sends: dict[tuple[int, int], list[tuple[int, Action, Action]]] = {}
    recvs: dict[tuple[int, int], list[tuple[int, Action]]] = {}
    for r, row in enumerate(s.ranks):
        for n, a in enumerate(row):
            if not a.kind.is_p2p:
                continue
            peer_rank, peer_action = rules.needs(r, a).peer  # type: ignore[misc]
            if a.kind in (K.SEND_F, K.SEND_B):
                sends.setdefault((r, peer_rank), []).append((n, a, peer_action))
            else:
                recvs.setdefault((peer_rank, r), []).append((n, a))
    for (src, dst), out in sends.items():
        inbound = recvs.get((src, dst), [])
        for (n_send, send, wanted), (n_recv, recv) in zip(out, inbound, strict=False):
            if recv != wanted:
                msg = (
                    f"rank {src} sends {send} to rank {dst} while rank {dst} expects {recv} next from it; "
                    "blocking sends and receives must pair up in the same order"
                )
                _fail(s, msg, {(src, n_send), (dst, n_recv)})
