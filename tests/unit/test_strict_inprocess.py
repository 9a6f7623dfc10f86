"""The strict in-process communicator replays whole schedules and fails loudly on an order mutant.

Each thread-rank runs its schedule row: transfers as blocking send/recv, each collective as one
asynchronous Communicator call of its kind and root (as the engine issues it), waited by the pass
that needs it; compute passes only as those waits. The builders' schedules run through; a rank with two shared
operations the other way round fails the whole group at once, naming both ranks and operations,
instead of hanging as NCCL would.
"""

from __future__ import annotations

import pytest
import torch
from _mutants import move_before, swappable_pairs

from vptrain.schedule import Action, PassKind, Schedule, ScheduleRules, build_schedule
from vptrain.schedule.order import shared_op
from vptrain.vocab.inprocess import ThreadComm, run_in_threads

K = PassKind
VOCAB = ("vocab-naive", "vocab-1", "vocab-2")
COMMUNICATING = [("interlaced", "1f1b")] + [(m, s) for m in VOCAB for s in ("1f1b", "vhalf")]
TIMEOUT_S = 30.0  # only reached if the strict checks failed to fire; the tests assert their messages


def _issue(comm: ThreadComm, rules: ScheduleRules, a: Action):
    """One Communicator call for collective `a`: its kind and root as in vptrain/engine/vocab_passes.py."""
    loss, embed = rules.stages.loss_place[0], rules.stages.embed_place[0]
    t = torch.zeros(2)
    comm.label = str(a)
    if a.kind in (K.X_BCAST, K.G_BCAST):
        return comm.broadcast(t, loss, async_op=True)
    if a.kind is K.DEMB_BCAST:
        return comm.broadcast(t, embed, async_op=True)
    if a.kind is K.EMB_REDUCE:
        return comm.reduce(t, embed, async_op=True)
    if a.kind is K.STATS:
        return comm.all_gather(torch.zeros(comm.world_size, 2), t, async_op=True)
    return comm.all_reduce(t, "max" if a.kind is K.MAX else "sum", async_op=True)


def replay(s: Schedule, rank: int, comm: ThreadComm) -> int:
    rules = ScheduleRules.of(method=s.method, name=s.name, p=s.p)
    works = {}
    for a in s.ranks[rank]:
        for awaited in rules.needs(rank, a).waits:
            works[awaited].wait()
        if a.kind.is_collective:
            works[a] = _issue(comm, rules, a)
        elif a.kind.is_p2p:
            op = shared_op(rules, rank, a)
            peer = rules.needs(rank, a).peer[0]
            if a.kind in (K.SEND_F, K.SEND_B):
                comm.send(torch.ones(3), peer, tag=op.describe())
            else:
                comm.recv(torch.empty(3), peer, tag=op.describe())
    for work in works.values():
        work.wait()
    return len(works)


def _run(s: Schedule) -> list[int]:
    return run_in_threads(s.p, lambda rank, comm: replay(s, rank, comm), timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("method,schedule", COMMUNICATING)
def test_every_builder_replays_under_the_strict_communicator(method: str, schedule: str) -> None:
    for p, m in ((2, 4), (3, 7), (4, 8)):
        s = build_schedule(method, schedule, p, m)
        issued = _run(s)
        assert issued == [len(ScheduleRules.of(method=method, name=schedule, p=p).method.collectives) * m] * p


def test_a_transfer_swapped_with_a_collective_fails_loudly() -> None:
    s = build_schedule("vocab-2", "1f1b", 2, 4)
    row = s.ranks[0]
    send, reduce_ = row.index(Action(K.SEND_F, 0)), row.index(Action(K.EMB_REDUCE, 3))
    bad = move_before(move_before(s, 0, send, reduce_ - 1), 0, send + 1, reduce_)  # IF3 EMB_REDUCE3 SEND_F0
    with pytest.raises(RuntimeError, match="ranks [01] and [01] issue the operations they share in different") as err:
        _run(bad)
    assert "EMB_REDUCE3" in str(err.value) and "p2p 0->1" in str(err.value) and "activation 0" in str(err.value)


def test_two_collectives_swapped_on_one_rank_fail_loudly() -> None:
    s = build_schedule("vocab-1", "1f1b", 3, 6)
    row = s.ranks[1]
    i, j = row.index(Action(K.EMB_REDUCE, 5)), row.index(Action(K.X_BCAST, 1))
    with pytest.raises(RuntimeError, match=r"collective #\d+: rank \d issued .* but rank \d issued") as err:
        _run(move_before(s, 1, i, j))
    assert "for EMB_REDUCE5" in str(err.value) and "for X_BCAST1" in str(err.value)


def test_the_same_collective_of_two_microbatches_swapped_fails_by_its_label() -> None:
    """Both are reduces of the same shape: only the schedule action tells them apart (NCCL would
    silently sum one microbatch's embeddings into the other's)."""
    s = build_schedule("vocab-1", "1f1b", 2, 4)
    row = s.ranks[1]
    i, j = row.index(Action(K.EMB_REDUCE, 1)), row.index(Action(K.EMB_REDUCE, 2))
    assert (row[i - 1], row[j - 1]) == (Action(K.IF, 1), Action(K.IF, 2))
    swapped = list(row)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    swapped[i - 1], swapped[j - 1] = swapped[j - 1], swapped[i - 1]  # their IFs too: local order holds
    ranks = (s.ranks[0], tuple(swapped))
    with pytest.raises(RuntimeError, match=r"collective #\d+: rank \d issued reduce") as err:
        _run(Schedule(ranks, s.method, s.name, s.num_microbatches, s.chunks))
    assert "for EMB_REDUCE1" in str(err.value) and "for EMB_REDUCE2" in str(err.value)


@pytest.mark.parametrize("method,schedule", COMMUNICATING)
def test_sampled_order_mutants_fail_loudly(method: str, schedule: str) -> None:
    s = build_schedule(method, schedule, 3, 6)
    for rank in range(s.p):
        pairs = swappable_pairs(s, rank)
        i, j = pairs[len(pairs) // 2]
        with pytest.raises(RuntimeError, match="different orders|issued .* but rank"):
            _run(move_before(s, rank, i, j))


def test_a_rank_that_skips_a_collective_fails_instead_of_timing_out() -> None:
    def body(rank: int, comm: ThreadComm) -> None:
        comm.all_reduce(torch.ones(2))
        if rank == 0:
            comm.all_reduce(torch.ones(2))

    with pytest.raises(RuntimeError, match="rank 0 waits in collective #1 .* but rank 1 returned without reaching it"):
        run_in_threads(2, body, timeout_s=TIMEOUT_S)
