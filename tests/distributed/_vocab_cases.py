"""The vocabulary-layer cases run inside one spawned gloo group (test_vocab_layers_gloo.py).

One group of WORLD ranks is spawned once; sub-groups of the first p ranks run every case for each
p in SIZES. Each rank checks its own outputs against the unsharded PyTorch layers (F.cross_entropy,
F.embedding on the full weights, computed identically on every rank) and returns, per case, the
list of mismatches (empty: passed), plus the collectives/barriers each algorithm issued.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from unit._vocab_problems import random_problem

from vptrain.vocab import (
    ALGOS,
    IGNORE_INDEX,
    CountingComm,
    ProcessGroupComm,
    VocabShard,
    accumulate_grad,
    apply_token_grad,
    c1_phase,
    dx_phase,
    embed_reduce,
    grad_broadcast,
    input_backward,
    input_forward,
    naive_max_phase,
    naive_sum_phase,
    output_layer_step,
    output_s_pass,
    output_t_pass,
    per_token_loss,
    token_grad,
)

WORLD = 4
SIZES = (2, 3, 4)
N, H = 24, 8
RTOL, ATOL = 1e-5, 1e-6  # fp32: rtol 1e-5 (atol for entries that cancel to ~0)
BF16_RTOL = 2e-2  # bf16 GEMMs (8-bit mantissa), fp32 statistics; atol = BF16_RTOL * max|expected|
OUTPUT_CASES = (
    "divisible",
    "not_divisible",
    "pad_multiple",
    "padding_only_shard",
    "targets_in_first_shard",
    "targets_in_last_shard",
    "masked",
)
# (chunk_tokens, store_softmax, async_op): every chunk/store combination, async on half of them.
OPTIONS = ((0, True, False), (0, False, True), (7, True, True), (7, False, False))
PIPELINED_ALGOS = ("naive", "alg1", "alg2")
EXPECTED_BARRIERS = {"naive": 3, "alg1": 2, "alg2": 1, "interlaced": 3}
EXPECTED_COLLECTIVES = {
    "naive": ["all_reduce_max", "all_reduce_sum", "all_reduce_sum"],
    "alg1": ["all_gather", "all_reduce_sum"],
    "alg2": ["all_gather", "all_reduce_sum"],
    "interlaced": ["all_reduce_max", "all_reduce_sum", "all_reduce_sum"],
}


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def vocab_of(case: str, p: int) -> tuple[int, int]:
    """(vocab_size, pad_to_multiple_of) of a case at p shards."""
    if case == "divisible":
        return 8 * p, 1
    if case == "pad_multiple":
        return 8 * p - 3, 8
    if case == "padding_only_shard":  # 9 tokens padded to 32 (96 at p=3): trailing shards are padding
        return 9, 32
    return 8 * p - 3, 1  # not a multiple of p: the last shard is partly padding


def problem(case: str, p: int, seed: int = 0, n: int = N) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab, pad = vocab_of(case, p)
    x, weight, labels = random_problem(n, H, vocab, p, pad, _gen(case, p, seed))
    shards = [VocabShard.of(vocab, p, r, pad_to_multiple_of=pad) for r in range(p)]
    if case == "targets_in_first_shard":
        labels = labels % shards[0].real_rows
    elif case == "targets_in_last_shard":
        last = shards[-1]
        labels = last.start + labels % last.real_rows
    elif case == "masked":
        labels[::3] = IGNORE_INDEX
    return vocab, pad, x, weight, labels


def unsharded(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int, normalizer: float):
    """Loss Σℓ/normalizer, ∇X and ∇W (padding rows zero) from F.cross_entropy on the full weight."""
    xr = x.detach().float().clone().requires_grad_()
    wr = weight[:vocab].detach().float().clone().requires_grad_()
    loss = F.cross_entropy(xr @ wr.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer
    loss.backward()
    grad_w = torch.zeros(weight.shape)
    grad_w[:vocab] = wr.grad
    return loss.detach(), xr.grad, grad_w


class Checks:
    def __init__(self) -> None:
        self.failures: dict[str, list[str]] = {}
        self.counts: dict[str, dict[str, Any]] = {}

    def close(self, key: str, what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
        fails = self.failures.setdefault(key, [])
        try:
            torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)
        except AssertionError as exc:
            fails.append(f"{key} {what}: {str(exc)[:400]}")

    def true(self, key: str, what: str, ok: bool) -> None:
        self.failures.setdefault(key, [])
        if not ok:
            self.failures[key].append(f"{key} {what}")


def output_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    for case in OUTPUT_CASES:
        vocab, pad, x, weight, labels = problem(case, p)
        shard = VocabShard.of(vocab, p, comm.rank, pad_to_multiple_of=pad)
        kept = int((labels != IGNORE_INDEX).sum())
        loss, gx, gw = unsharded(x, weight, labels, vocab, kept)
        for algo in ALGOS:
            for chunk, store, async_op in OPTIONS:
                key = f"p{p}/{case}/{algo}/chunk{chunk}-store{int(store)}-async{int(async_op)}"
                res = output_layer_step(
                    x, weight[shard.start : shard.end], labels, shard, comm, algo,
                    loss_normalizer=kept, chunk_tokens=chunk, store_softmax=store, async_op=async_op,
                )  # fmt: skip
                checks.close(key, "loss", res.loss, loss, RTOL, ATOL)
                checks.close(key, "grad_x", res.grad_x, gx, RTOL, ATOL)
                checks.close(key, "grad_w", res.grad_w, gw[shard.start : shard.end], RTOL, ATOL)
                checks.true(
                    key, "padding grad_w rows are exactly 0", bool(torch.all(res.grad_w[shard.real_rows :] == 0))
                )


def bf16_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    vocab, pad, x, weight, labels = problem("not_divisible", p)
    x16, w16 = x.bfloat16(), weight.bfloat16()
    shard = VocabShard.of(vocab, p, comm.rank, pad_to_multiple_of=pad)
    loss, gx, gw = unsharded(x16, w16, labels, vocab, N)  # fp32 math on the bf16-rounded values
    for algo in ALGOS:
        for chunk, store in ((0, True), (7, False)):
            key = f"p{p}/bf16/{algo}/chunk{chunk}-store{int(store)}"
            res = output_layer_step(x16, w16[shard.start : shard.end], labels, shard, comm, algo,
                                    loss_normalizer=N, chunk_tokens=chunk, store_softmax=store)  # fmt: skip
            checks.true(key, "fp32 outputs", res.grad_w.dtype == res.grad_x.dtype == res.loss.dtype == torch.float32)
            checks.close(key, "loss", res.loss, loss, 1e-2, 1e-2)
            checks.close(key, "grad_x", res.grad_x, gx, BF16_RTOL, BF16_RTOL * float(gx.abs().max()))
            checks.close(
                key, "grad_w", res.grad_w, gw[shard.start : shard.end], BF16_RTOL, BF16_RTOL * float(gw.abs().max())
            )


def input_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    vocab, pad, _, weight, _ = problem("pad_multiple", p)
    gen = _gen("input", p)
    ids = torch.randint(0, vocab, (3, 8), generator=gen)
    ids[0, :4] = ids[2, 1]  # a repeated token accumulates several gradient rows
    grad_emb = torch.randn(3, 8, H, generator=gen)
    table = weight[:vocab].clone().requires_grad_()
    expected = F.embedding(ids, table)
    expected.backward(grad_emb)
    shard = VocabShard.of(vocab, p, comm.rank, pad_to_multiple_of=pad)
    for dst in (None, p - 1):
        key = f"p{p}/input/dst{dst}"
        partial = input_forward(ids, weight[shard.start : shard.end], shard)
        embed_reduce(partial, comm, dst, async_op=True).wait()
        if dst is None or comm.rank == dst:
            checks.close(key, "embedding", partial, expected.detach(), 0.0, 0.0)
        owner = p - 1 if dst is None else 0
        grad = grad_emb.clone() if comm.rank == owner else torch.full_like(grad_emb, float("nan"))
        grad_broadcast(grad, comm, owner, async_op=dst is None).wait()
        grad_w = input_backward(ids, grad, shard)
        checks.close(
            key,
            "grad_w",
            grad_w[: shard.real_rows],
            table.grad[shard.start : shard.start + shard.real_rows],
            RTOL,
            ATOL,
        )
        checks.true(key, "padding grad_w rows are exactly 0", bool(torch.all(grad_w[shard.real_rows :] == 0)))


def tied_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    """One table for input and output: IF -> (tanh, standing in for the body) -> S..T -> IB."""
    vocab, pad, _, weight, labels = problem("not_divisible", p, seed=1)
    ids = torch.randint(0, vocab, (N,), generator=_gen("tied", p))
    table = weight[:vocab].clone().requires_grad_()
    hidden = torch.tanh(F.embedding(ids, table)) * 1.3
    loss = F.cross_entropy(hidden @ table.t(), labels, reduction="sum") / N
    loss.backward()
    shard = VocabShard.of(vocab, p, comm.rank, pad_to_multiple_of=pad)
    for algo in ALGOS:
        key = f"p{p}/tied/{algo}"
        param = weight[shard.start : shard.end].clone().requires_grad_()
        emb = input_forward(ids, param, shard)
        embed_reduce(emb, comm)
        emb.requires_grad_()
        body = torch.tanh(emb) * 1.3
        res = output_layer_step(body.detach(), param, labels, shard, comm, algo, loss_normalizer=N)
        owner = 0  # the rank whose pipeline stage holds the first block
        grad_emb = torch.full_like(emb, float("nan"))
        if comm.rank == owner:
            (grad_emb,) = torch.autograd.grad(body, emb, res.grad_x)
        grad_broadcast(grad_emb, comm, owner)
        accumulate_grad(param, res.grad_w)
        accumulate_grad(param, input_backward(ids, grad_emb, shard))
        checks.close(key, "loss", res.loss, loss.detach(), RTOL, ATOL)
        real = shard.real_rows
        checks.close(key, "grad_w", param.grad[:real], table.grad[shard.start : shard.start + real], RTOL, ATOL)
        checks.true(key, "padding grad rows are exactly 0", bool(torch.all(param.grad[real:] == 0)))


def _pipelined(algo, xs, labels, total, w, shard, comm):
    """Engine order for 3 microbatches: S_i and its async phase, then T_{i-1} and its async ∇X.

    naive runs its two statistics barriers as separate phases with S of the next microbatch between.
    """
    states, c1, dx, grad_x, losses = {}, {}, {}, {}, {}
    grad_w = torch.zeros(w.shape)

    def finish(j: int) -> None:
        c1[j].wait()
        if algo == "naive":
            naive_sum_phase(states[j], comm, async_op=True).wait()
        losses[j] = per_token_loss(states[j]).sum() / total
        g = token_grad(labels[j], total)
        gx, gw = output_t_pass(states[j], g)
        grad_w.add_(gw)
        if gx is None:
            grad_x[j] = apply_token_grad(states[j].grad_x_hat, g)
        else:
            grad_x[j], dx[j] = gx, dx_phase(gx, comm, async_op=True)

    for i in range(3):
        states[i] = output_s_pass(xs[i], w, labels[i], shard, algo, chunk_tokens=5 * (i % 2))
        c1[i] = (naive_max_phase if algo == "naive" else c1_phase)(states[i], comm, async_op=True)
        if i:
            finish(i - 1)
    finish(2)
    for pending in dx.values():
        pending.wait()
    return sum(losses.values()), [grad_x[j] for j in range(3)], grad_w


def pipelined_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    """3 microbatches in flight; microbatch 1 is entirely masked (legal, adds nothing); one loss."""
    batches = [problem("not_divisible", p, seed=10 + i) for i in range(3)]
    vocab, pad, _, weight, _ = batches[0]
    batches[1][4][:] = IGNORE_INDEX
    labels = [b[4] for b in batches]
    xs = [b[2] for b in batches]
    total = sum(int((y != IGNORE_INDEX).sum()) for y in labels)
    expected = [unsharded(x, weight, y, vocab, total) for x, y in zip(xs, labels, strict=True)]
    shard = VocabShard.of(vocab, p, comm.rank, pad_to_multiple_of=pad)
    w = weight[shard.start : shard.end]
    for algo in PIPELINED_ALGOS:
        key = f"p{p}/pipelined/{algo}"
        loss, grad_x, grad_w = _pipelined(algo, xs, labels, total, w, shard, comm)
        checks.close(key, "loss", loss, sum(e[0] for e in expected), RTOL, ATOL)
        for j in range(3):
            checks.close(key, f"grad_x[{j}]", grad_x[j], expected[j][1], RTOL, ATOL)
        checks.close(key, "grad_w", grad_w, sum(e[2] for e in expected)[shard.start : shard.end], RTOL, ATOL)


class ComputeTracker(TorchDispatchMode):
    """Appends ("compute", op) to a shared event list for every op that is a pass over the data.

    A "pass" is a GEMM or an op touching at least `threshold` elements (the shard's logits). The
    O(N) and O(N·h) bookkeeping between chained collectives (h < V/p here) is not a pass.
    """

    GEMMS = {"mm", "addmm", "bmm", "matmul"}

    def __init__(self, events: list, threshold: int) -> None:
        super().__init__()
        self.events, self.threshold = events, threshold

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "c10d":
            sizes = [t.numel() for t in (*args, out) if isinstance(t, torch.Tensor)]
            if func.__name__.split(".")[0] in self.GEMMS or max(sizes, default=0) >= self.threshold:
                self.events.append(("compute", func.__name__))
        return out


def count_barriers(events: list) -> int:
    """Maximal runs of collectives with no compute pass between them."""
    barriers, previous = 0, "compute"
    for event in events:
        if event[0] == "collective" and previous == "compute":
            barriers += 1
        previous = event[0]
    return barriers


def count_cases(p: int, comm: ProcessGroupComm, checks: Checks) -> None:
    vocab = 32 * p  # 32 rows per shard > H, so the O(N·h) bookkeeping is not mistaken for a pass
    gen = _gen("count", p)
    weight, x = torch.randn(vocab, H, generator=gen), torch.randn(N, H, generator=gen)
    labels = torch.randint(0, vocab, (N,), generator=gen)
    shard = VocabShard.of(vocab, p, comm.rank)
    for algo in ALGOS:
        events: list = []
        counting = CountingComm(comm, events)
        with ComputeTracker(events, threshold=N * shard.real_rows):
            output_layer_step(x, weight[shard.start : shard.end], labels, shard, counting, algo, loss_normalizer=N)
        checks.counts[f"p{p}/{algo}"] = {"collectives": counting.collectives, "barriers": count_barriers(events)}


def worker(rank: int, world_size: int) -> dict[str, Any]:
    groups = {p: dist.new_group(list(range(p))) for p in SIZES}  # every rank creates every group
    checks = Checks()
    for p in SIZES:
        if rank >= p:
            continue
        comm = ProcessGroupComm(groups[p])
        for run in (output_cases, bf16_cases, input_cases, tied_cases, pipelined_cases, count_cases):
            run(p, comm, checks)
    return {"failures": checks.failures, "counts": checks.counts}
