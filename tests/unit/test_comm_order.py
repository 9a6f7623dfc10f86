"""One communication order for every pair of ranks (DESIGN.md invariant 5).

Any two ranks must run the operations they share (the transfers between them, every vocabulary
collective) in the same relative order: NCCL hangs otherwise. The builders emit such schedules for
every method x schedule x p x m, and the validator rejects any schedule in which one rank has two
communication actions the other way round. Here a brute-force pair-by-pair check samples the grid;
the whole grid (p 2..8, m p..4p) goes through the validator's rule in
test_schedule_builders.py::test_builders_are_valid_over_the_whole_grid.
"""

from __future__ import annotations

import random

import pytest
from _mutants import move_before, swappable_pairs

from vptrain.schedule import Action, PassKind, Schedule, ScheduleError, ScheduleRules, build_schedule, validate_schedule
from vptrain.schedule.order import ALL, shared_op

K = PassKind
BUILDERS = [(method, "1f1b") for method in ("baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2")]
BUILDERS += [(method, "vhalf") for method in ("baseline", "vocab-naive", "vocab-1", "vocab-2")]


def _rules(s: Schedule) -> ScheduleRules:
    return ScheduleRules.of(method=s.method, name=s.name, p=s.p)


def _pair_sequences(s: Schedule, a: int, b: int) -> tuple[list, list]:
    """What ranks a and b share, each in its own order, as the pair names it (brute force: every
    action of both ranks, no shortcut through the collective order)."""
    rules = _rules(s)
    seqs = []
    for me, other in ((a, b), (b, a)):
        ops = (shared_op(rules, me, x) for x in s.ranks[me])
        seqs.append([op.key for op in ops if op is not None and op.peer in (ALL, other)])
    return seqs[0], seqs[1]


def _assert_one_order(s: Schedule) -> None:
    for a in range(s.p):
        for b in range(a + 1, s.p):
            seq_a, seq_b = _pair_sequences(s, a, b)
            assert seq_a == seq_b, f"{s.method}/{s.name} p={s.p} m={s.num_microbatches}: ranks {a}, {b} differ"


def _ms(p: int) -> list[int]:
    return sorted({p, p + 1, 2 * p + 1, 4 * p})


@pytest.mark.parametrize("method,schedule", BUILDERS)
def test_every_pair_of_ranks_shares_one_order(method: str, schedule: str) -> None:
    for p in (2, 3, 5, 8):
        for m in _ms(p):
            _assert_one_order(build_schedule(method, schedule, p, m))


def test_the_reported_reproduction_now_shares_one_order() -> None:
    """`vptrain plan method=vocab-2 layout.pp=2 train.global_batch_size=4` used to run SEND_F0 before
    EMB_REDUCE3 on rank 0 and EMB_REDUCE3 before RECV_F0 on rank 1."""
    s = build_schedule("vocab-2", "1f1b", 2, 4)
    row0, row1 = s.ranks
    assert row0.index(Action(K.SEND_F, 0)) < row0.index(Action(K.EMB_REDUCE, 3))
    assert row1.index(Action(K.RECV_F, 0)) < row1.index(Action(K.EMB_REDUCE, 3))


def test_a_transfer_swapped_with_a_collective_is_rejected_naming_both_ranks_and_ops() -> None:
    s = build_schedule("vocab-2", "1f1b", 2, 4)
    row = s.ranks[0]
    send, reduce_ = row.index(Action(K.SEND_F, 0)), row.index(Action(K.EMB_REDUCE, 3))
    assert row[reduce_ - 1] == Action(K.IF, 3) and send < reduce_ - 1
    # F0 SEND_F0 IF3 EMB_REDUCE3 -> F0 IF3 EMB_REDUCE3 SEND_F0: what the old lowering did.
    bad = move_before(move_before(s, 0, send, reduce_ - 1), 0, send + 1, reduce_)
    with pytest.raises(ScheduleError) as err:
        validate_schedule(bad)
    text = str(err.value)
    first_line = text.splitlines()[0]
    assert "ranks 0 and 1 share EMB_REDUCE3 and activation 0 sent by rank 0 in opposite orders" in first_line
    assert "rank 0 runs EMB_REDUCE3" in first_line and "before SEND_F0" in first_line
    assert "rank 1 runs RECV_F0" in first_line and "before EMB_REDUCE3" in first_line
    for cell in (">EMB_REDUCE3<", ">SEND_F0<", ">RECV_F0<"):
        assert cell in text  # the grid marks the operations out of order on both ranks


def test_two_collectives_swapped_on_one_rank_are_rejected_naming_both() -> None:
    s = build_schedule("vocab-1", "1f1b", 3, 6)
    row = s.ranks[1]
    i, j = row.index(Action(K.EMB_REDUCE, 5)), row.index(Action(K.X_BCAST, 1))
    assert j == i + 1  # a broadcast's receiver may post it any time: only the order is wrong
    with pytest.raises(ScheduleError, match="ranks 0 and 1 share EMB_REDUCE5 and X_BCAST1 in opposite orders") as err:
        validate_schedule(move_before(s, 1, i, j))
    assert ">X_BCAST1<" in str(err.value) and ">EMB_REDUCE5<" in str(err.value)


@pytest.mark.parametrize("method,schedule", BUILDERS)
def test_swapping_two_communication_actions_on_one_rank_is_rejected(method: str, schedule: str) -> None:
    rng = random.Random(f"{method}/{schedule}")
    tried = 0
    for p, m in ((2, 4), (3, 7), (4, 8), (5, 12)):
        s = build_schedule(method, schedule, p, m)
        for rank in range(p):
            pairs = swappable_pairs(s, rank)
            named = rf"ranks ({rank} and \d+|\d+ and {rank}) share .* in opposite orders"
            for i, j in rng.sample(pairs, min(3, len(pairs))):
                with pytest.raises(ScheduleError, match=named):
                    validate_schedule(move_before(s, rank, i, j), check_deadlock=False)
                tried += 1
    assert tried >= 20
