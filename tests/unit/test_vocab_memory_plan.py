"""Bounded vocabulary memory (DESIGN.md invariant 7): release points, byte accounting, reduce variants.

The engine's measured bytes are compared with these predictions in
tests/distributed/test_vocab_memory.py; here the accounting itself is held to its properties.
"""

from __future__ import annotations

import random
from dataclasses import astuple, replace

import pytest
import torch

from vptrain.schedule import Action, PassCosts, PassKind, ScheduleRules, build_schedule, simulate
from vptrain.schedule.costs import ModelShape, vocab_buffer_sizes
from vptrain.schedule.memory import fire_and_forget, release_points, vocab_live_bytes
from vptrain.vocab import VocabShard, dx_phase, grad_input_phase, output_s_pass, padded_vocab_rows, stats_phase
from vptrain.vocab.inprocess import run_in_threads

K = PassKind
OVERLAPPED = [(m, s) for m in ("vocab-naive", "vocab-1", "vocab-2") for s in ("1f1b", "vhalf")]
ALL_VOCAB = [*OVERLAPPED, ("interlaced", "1f1b")]
SHAPE = ModelShape(vocab=1000, vocab_rows=1024, layers=8, hidden=64, seq=16, micro_batch=1, act_bytes=4)


def _peak(method: str, name: str, p: int, m: int, shape: ModelShape = SHAPE, **kw) -> int:
    s = build_schedule(method, name, p, m)
    return max(max(row) for row in vocab_live_bytes(s, vocab_buffer_sizes(shape, method=method, p=p, **kw)))


@pytest.mark.parametrize("method,name", ALL_VOCAB)
@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_memory_of_the_vocabulary_buffers_does_not_grow_with_the_microbatches(method, name, p):
    """Eight times p microbatches hold what four times p do, give or take one microbatch's buffers
    (the steady state of the builders differs slightly with m). A result kept until the optimizer
    step would add a buffer per microbatch."""
    one_microbatch = max(sum(astuple(z)) for z in vocab_buffer_sizes(SHAPE, method=method, p=p))
    assert _peak(method, name, p, 8 * p) <= _peak(method, name, p, 4 * p) + one_microbatch


@pytest.mark.parametrize("method,name", ALL_VOCAB)
@pytest.mark.parametrize("p", range(2, 9))
def test_memory_every_unconsumed_reduce_is_released_before_the_optimizer_step(method, name, p):
    """No reduce a rank only contributes to waits for the optimizer step: the schedule always proves
    it issued everywhere at some later action of the rank."""
    for m in (p, 2 * p, 4 * p):
        s = build_schedule(method, name, p, m)
        rules = ScheduleRules.of(method=method, name=name, p=p)
        releases = release_points(s, rules)
        for r, row in enumerate(s.ranks):
            issued = {a: n for n, a in enumerate(row) if a.kind in fire_and_forget(rules, r)}
            released = {a: n for n, acts in releases[r].items() for a in acts}
            assert released.keys() == issued.keys()
            assert all(issued[a] < released[a] < len(row) - 1 for a in issued), (r, m)


@pytest.mark.parametrize("method,name", ALL_VOCAB)
@pytest.mark.parametrize("seed", range(3))
def test_memory_release_points_follow_every_rank_issue_under_any_costs(method, name, seed):
    """Soundness: waiting at a release point never waits for a peer. Whatever the pass and
    collective costs, the simulator (which respects every dependency of the schedule) has every rank
    issue the collective before the releasing action ends."""
    p, m = 4, 10
    s = build_schedule(method, name, p, m)
    rng = random.Random(seed)
    costs = PassCosts(
        compute=tuple({(k, c): rng.uniform(0.1, 3.0) for k in (K.F, K.B, K.S, K.T, K.IF, K.IB) for c in range(2)}
                      for _ in range(p)),
        p2p=rng.uniform(0.0, 0.5),
        collective={k: rng.uniform(0.0, 2.0) for k in PassKind if k.is_collective},
    )
    sim = simulate(s, costs)
    issue_time = {(r, a): sim.start[r][n] for r, row in enumerate(s.ranks) for n, a in enumerate(row)
                  if a.kind.is_collective}
    for r, points in enumerate(release_points(s)):
        for n, actions in points.items():
            for a in actions:
                assert max(issue_time[(q, a)] for q in range(p)) <= sim.end[r][n] + 1e-9, (r, n, a)


def test_memory_reduce_onto_the_loss_rank_leaves_the_others_no_input_gradient():
    """With a reduce, the ranks off the loss rank release their ∇X partials (vocab-1) and ∇X̂ parts
    (vocab-2): the reduced input gradient only ever lives on the loss rank."""
    p, m = 8, 32
    for method, kind in (("vocab-1", K.DX_REDUCE), ("vocab-2", K.DXHAT)):
        s = build_schedule(method, "1f1b", p, m)
        rules = ScheduleRules.of(method=method, name="1f1b", p=p)
        releases = release_points(s, rules)
        loss_rank = rules.stages.loss_place[0]
        assert kind not in fire_and_forget(rules, loss_rank) and not releases[loss_rank].get(kind)
        for r in range(p):
            if r != loss_rank:
                released = {a for acts in releases[r].values() for a in acts if a.kind is kind}
                assert released == {Action(kind, i) for i in range(m)}


def test_memory_drops_with_the_softmax_buffer_and_grows_with_the_vocabulary():
    p, m = 4, 16
    for method, name in OVERLAPPED:
        stored, recomputed = _peak(method, name, p, m), _peak(method, name, p, m, store_softmax=False)
        softmax = vocab_buffer_sizes(SHAPE, method=method, p=p)[0].softmax
        # The stored softmax raises the peak; by a whole softmax where the peak moment stays the same
        # (1F1B), by less where dropping it moves the peak to another moment (V-Half's W-free steps).
        assert recomputed < stored
        if name == "1f1b":
            assert recomputed <= stored - softmax
        wide = replace(SHAPE, vocab=4000, vocab_rows=4096)
        assert _peak(method, name, p, m, wide) > stored
        assert _peak(method, name, p, m, wide, store_softmax=False) == recomputed  # the softmax is all that grew


def test_memory_sizes_follow_the_algorithm():
    """vocab-2 keeps A_r and G_r (two N x h fp32) and no ∇X partial; the others the reverse."""
    n, h = SHAPE.tokens, SHAPE.hidden
    one, two = vocab_buffer_sizes(SHAPE, method="vocab-1", p=4)[0], vocab_buffer_sizes(SHAPE, method="vocab-2", p=4)[0]
    assert (one.grad_x, one.a_local, one.target_rows) == (n * h * 4, 0, 0)
    assert (two.grad_x, two.a_local, two.target_rows) == (0, n * h * 4, n * h * 4)
    last = vocab_buffer_sizes(SHAPE, method="vocab-1", p=4)[-1]
    assert last.softmax == n * (SHAPE.vocab - 3 * 256) * 4  # the last shard's real rows only


def _phases_case(rank, comm, *, p, algo):
    vocab, h, n = 37, 5, 11
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(padded_vocab_rows(vocab, p), h, generator=gen)
    x, labels = torch.randn(n, h, generator=gen), torch.randint(0, vocab, (n,), generator=gen)
    shard = VocabShard.of(vocab, p, rank)
    out = {}
    for dst in (None, p - 1):
        state = output_s_pass(x, weight[shard.start : shard.end], labels, shard, algo)
        stats_phase(state, comm).wait()
        if algo == "alg2":
            pending = grad_input_phase(state, comm, async_op=True, dst=dst)
            pending.wait()
            out[dst] = (pending.result.clone(), state.grad_x_hat is not None, state.a_local is None)
        else:
            partial = torch.randn(n, h, generator=torch.Generator().manual_seed(rank))
            pending = dx_phase(partial, comm, async_op=True, dst=dst)
            pending.wait()
            out[dst] = (pending.result.clone(), True, True)
    return out


@pytest.mark.parametrize("algo", ["alg1", "alg2"])
def test_memory_reduce_variants_equal_the_all_reduce_on_the_destination(algo):
    p = 3
    results = run_in_threads(p, lambda rank, comm: _phases_case(rank, comm, p=p, algo=algo))
    everywhere, onto_last = results[-1][None], results[-1][p - 1]
    torch.testing.assert_close(onto_last[0], everywhere[0], rtol=1e-6, atol=1e-7)
    if algo == "alg2":
        for rank, result in enumerate(results):
            _, published, freed = result[p - 1]
            assert not published and freed, f"rank {rank}: the state keeps ∇X̂ after a reduce"
