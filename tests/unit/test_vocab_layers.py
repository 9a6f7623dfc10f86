"""The production passes and phases, run in one process (p threads as p ranks), against the reference.

Real multi-process runs over gloo are in tests/distributed/test_vocab_layers_gloo.py.
"""

from __future__ import annotations

import pytest
import torch
from _vocab_problems import random_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from vptrain.vocab import (
    ALGOS,
    IGNORE_INDEX,
    VocabShard,
    accumulate_grad,
    c1_phase,
    dx_phase,
    embed_reduce,
    grad_broadcast,
    grad_input_phase,
    input_backward,
    input_forward,
    naive_max_phase,
    naive_sum_phase,
    output_layer_step,
    output_s_pass,
    output_t_pass,
    padded_vocab_rows,
    per_token_loss,
    stats_phase,
    token_grad,
)
from vptrain.vocab import reference as ref
from vptrain.vocab.inprocess import ThreadGroup, run_in_threads

RTOL, ATOL = 1e-5, 1e-6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 33),
    h=st.integers(1, 9),
    vocab=st.integers(1, 50),
    shards=st.integers(1, 5),
    pad=st.sampled_from([1, 4, 16]),
    algo=st.sampled_from(ALGOS),
    chunk=st.integers(0, 12),
    store=st.booleans(),
    async_op=st.booleans(),
    ignore_every=st.sampled_from([0, 1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_sharded_output_layer_matches_reference(
    n, h, vocab, shards, pad, algo, chunk, store, async_op, ignore_every, seed
) -> None:
    x, weight, labels = random_problem(n, h, vocab, shards, pad, seed, ignore_every)
    kept = max(int((labels != IGNORE_INDEX).sum()), 1)
    expected = ref.output_layer(x, weight, labels, vocab, shards, token_grad(labels, kept), pad_to_multiple_of=pad)

    def rank_fn(rank, comm):
        shard = VocabShard.of(vocab, shards, rank, pad_to_multiple_of=pad)
        return output_layer_step(
            x,
            weight[shard.start : shard.end],
            labels,
            shard,
            comm,
            algo,
            loss_normalizer=kept,
            chunk_tokens=chunk,
            store_softmax=store,
            async_op=async_op,
        )

    results = run_in_threads(shards, rank_fn)
    for res in results:
        torch.testing.assert_close(res.loss, expected.per_token_loss.sum() / kept, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res.grad_x, expected.grad_x, rtol=RTOL, atol=ATOL)
    grad_w = torch.cat([res.grad_w for res in results])
    torch.testing.assert_close(grad_w, expected.grad_w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("algo", ["alg1", "alg2", "naive"])
def test_microbatches_in_flight_finish_in_any_order(algo: str) -> None:
    """S of microbatch 1 runs before T of microbatch 0, T's run in reverse; state is per microbatch."""
    vocab, shards = 37, 3
    batches = [random_problem(10, 6, vocab, shards, 1, seed) for seed in (11, 12)]
    weight = batches[0][1]
    gs = [token_grad(labels, 20) for _, _, labels in batches]  # one loss over both microbatches

    def rank_fn(rank, comm):
        shard = VocabShard.of(vocab, shards, rank)
        w = weight[shard.start : shard.end]
        states = [output_s_pass(x, w, labels, shard, algo) for x, _, labels in batches]
        pend = [c1_phase(s, comm, async_op=True) for s in states]
        pend[1].wait()
        pend[0].wait()
        outs = [output_t_pass(states[i], gs[i]) for i in (1, 0)][::-1]
        grad_xs = []
        for state, (gx, _), g in zip(states, outs, gs, strict=True):
            if gx is None:
                gx = state.grad_x_hat * g[:, None]
            else:
                dx_phase(gx, comm)
            grad_xs.append(gx)
        return grad_xs, outs[0][1] + outs[1][1]

    results = run_in_threads(shards, rank_fn)
    refs = [
        ref.output_layer(x, weight, labels, vocab, shards, g) for (x, _, labels), g in zip(batches, gs, strict=True)
    ]
    for grad_xs, _ in results:
        for gx, r in zip(grad_xs, refs, strict=True):
            torch.testing.assert_close(gx, r.grad_x, rtol=RTOL, atol=ATOL)
    grad_w = torch.cat([gw for _, gw in results])
    torch.testing.assert_close(grad_w, refs[0].grad_w + refs[1].grad_w, rtol=RTOL, atol=ATOL)


class _LargestOutput(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces (the transient logits buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("algo", ["naive", "alg1", "alg2"])
def test_chunks_without_stored_softmax_bound_the_fp32_buffer(algo: str) -> None:
    n, h, vocab, chunk = 64, 4, 96, 8
    x, weight, labels = random_problem(n, h, vocab, 1, 1, 3)
    shard = VocabShard.of(vocab, 1, 0)
    sizes = {}
    for chunk_tokens, store in ((0, True), (chunk, False)):
        tracker = _LargestOutput()

        def rank_fn(rank, comm, chunk_tokens=chunk_tokens, store=store, tracker=tracker):
            with tracker:
                return output_layer_step(
                    x,
                    weight,
                    labels,
                    shard,
                    comm,
                    algo,
                    loss_normalizer=n,
                    chunk_tokens=chunk_tokens,
                    store_softmax=store,
                )

        res = run_in_threads(1, rank_fn)[0]
        sizes[store] = tracker.largest
        expected = ref.output_layer(x, weight, labels, vocab, 1, token_grad(labels, n))
        torch.testing.assert_close(res.grad_x, expected.grad_x, rtol=RTOL, atol=ATOL)
    assert sizes[True] >= n * vocab  # the whole [N, V/p] softmax exists
    assert sizes[False] <= max(chunk * vocab, vocab * h, n * h)  # at most one chunk of logits


def test_bf16_weights_keep_fp32_statistics() -> None:
    """bf16 GEMMs, fp32 softmax: within 2e-2 (relative to the gradient's scale) of fp32 math."""
    vocab, shards, n = 50, 2, 24
    x, weight, labels = random_problem(n, 16, vocab, shards, 1, 5)
    w16 = weight.to(torch.bfloat16)
    expected = ref.output_layer(x.bfloat16().float(), w16.float(), labels, vocab, shards, token_grad(labels, n))
    for algo in ALGOS:

        def rank_fn(rank, comm, algo=algo):
            shard = VocabShard.of(vocab, shards, rank)
            return output_layer_step(
                x.bfloat16(), w16[shard.start : shard.end], labels, shard, comm, algo, loss_normalizer=n
            )

        results = run_in_threads(shards, rank_fn)
        assert results[0].loss.dtype == torch.float32 and results[0].grad_w.dtype == torch.float32
        torch.testing.assert_close(results[0].loss, expected.per_token_loss.mean(), rtol=1e-2, atol=1e-2)
        scale = expected.grad_x.abs().max()
        torch.testing.assert_close(results[0].grad_x, expected.grad_x, rtol=2e-2, atol=2e-2 * scale)
        grad_w = torch.cat([r.grad_w for r in results])
        torch.testing.assert_close(grad_w, expected.grad_w, rtol=2e-2, atol=2e-2 * expected.grad_w.abs().max())


@pytest.mark.parametrize("dst", [None, 0, 2])
def test_input_layer_matches_reference(dst) -> None:
    vocab, shards, pad = 22, 3, 4
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(padded_vocab_rows(vocab, shards, pad), 5, generator=gen)
    ids = torch.randint(0, vocab, (2, 9), generator=gen)
    grad_emb = torch.randn(2, 9, 5, generator=gen)
    emb_ref, grad_ref = ref.input_layer(ids, weight, vocab, shards, grad_emb, pad_to_multiple_of=pad)
    owner = 0 if dst is None else dst

    def rank_fn(rank, comm):
        shard = VocabShard.of(vocab, shards, rank, pad_to_multiple_of=pad)
        partial = input_forward(ids, weight[shard.start : shard.end], shard)
        embed_reduce(partial, comm, dst, async_op=True).wait()
        grad = grad_emb.clone() if rank == owner else torch.full_like(grad_emb, float("nan"))
        grad_broadcast(grad, comm, owner)
        return partial, input_backward(ids, grad, shard)

    results = run_in_threads(shards, rank_fn)
    for rank, (emb, _) in enumerate(results):
        if dst is None or rank == dst:
            torch.testing.assert_close(emb, emb_ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([gw for _, gw in results]), grad_ref, rtol=RTOL, atol=ATOL)


def test_phases_refuse_to_run_out_of_order() -> None:
    x, weight, labels = random_problem(4, 3, 8, 1, 1, 0)
    shard = VocabShard.of(8, 1, 0)
    comm = ThreadGroup(1).comm(0)
    state = output_s_pass(x, weight, labels, shard, "alg1")
    with pytest.raises(RuntimeError, match="stats_phase"):
        output_t_pass(state, torch.ones(4))
    with pytest.raises(RuntimeError, match="stats_phase"):
        per_token_loss(state)
    stats_phase(state, comm)
    with pytest.raises(RuntimeError, match="already ran"):
        stats_phase(state, comm)
    with pytest.raises(RuntimeError, match="alg2"):
        grad_input_phase(state, comm)
    output_t_pass(state, torch.ones(4))
    with pytest.raises(RuntimeError, match="already ran"):
        output_t_pass(state, torch.ones(4))
    with pytest.raises(RuntimeError, match="naive"):
        naive_max_phase(state, comm)
    naive = output_s_pass(x, weight, labels, shard, "naive")
    with pytest.raises(RuntimeError, match="naive_max_phase"):
        naive_sum_phase(naive, comm)
    naive_max_phase(naive, comm)
    with pytest.raises(RuntimeError, match="stats_phase"):
        per_token_loss(naive)  # the max alone is not the statistics
    naive_sum_phase(naive, comm)
    torch.testing.assert_close(
        per_token_loss(naive).sum(), torch.nn.functional.cross_entropy(x @ weight.t(), labels, reduction="sum")
    )
    with pytest.raises(ValueError, match="unknown output algorithm"):
        output_s_pass(x, weight, labels, shard, "alg3")
    with pytest.raises(RuntimeError):
        output_s_pass(x, weight, torch.full((4,), 8), shard, "alg1")  # label past the real vocabulary


def test_thread_group_rejects_mismatched_collectives() -> None:
    def rank_fn(rank, comm):
        t = torch.ones(3)
        if rank == 0:
            comm.all_reduce(t)
        else:
            comm.broadcast(t, 0)

    with pytest.raises(RuntimeError, match="issued"):
        run_in_threads(2, rank_fn, timeout_s=10)


def test_accumulate_grad_goes_through_autograd_hooks() -> None:
    param = torch.zeros(3, 2, dtype=torch.bfloat16, requires_grad=True)
    seen = []
    param.register_hook(lambda grad: seen.append(grad.dtype))
    accumulate_grad(param, torch.full((3, 2), 0.5))
    accumulate_grad(param, torch.full((3, 2), 0.25))  # a tied weight: IB and T both add
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert param.grad is not None and torch.all(param.grad == 0.75)
    with pytest.raises(ValueError, match="leaf"):
        accumulate_grad(param * 2, torch.ones(3, 2))
