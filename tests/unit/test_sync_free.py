"""No host synchronisation inside a pass (DESIGN.md invariant 6), checked on CPU.

Every pass and collective phase of every output-layer algorithm (S; the statistics, max, sum, ∇X̂
and ∇X phases, each issued and waited; the loss and g; T), the input layer (IF, the embedding
reduce, the gradient broadcast, IB), tied and untied, chunked or not, with the softmax kept or not,
fp32 and bf16, and the single-process trainer's F and B (the plain pipeline's loss), all run under
vptrain.host_sync.forbid_host_sync, which raises on any operation that would make a GPU's host wait.
The passes run on p threads as p ranks; the guard is per thread, so each rank enters it itself. The
results are also checked against the reference, so a guarded run is a real run.

The engines' own handlers run under the same guard in tests/distributed/test_engine_passes.py.
"""

from __future__ import annotations

import pytest
import torch
from _vocab_problems import random_problem
from omegaconf import OmegaConf

from vptrain.host_sync import HostSyncError, forbid_host_sync
from vptrain.vocab import (
    ALGOS,
    IGNORE_INDEX,
    VocabShard,
    accumulate_grad,
    apply_token_grad,
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
    per_token_loss,
    stats_phase,
    token_grad,
)
from vptrain.vocab import reference as ref
from vptrain.vocab.inprocess import run_in_threads

VOCAB, PAD, SHARDS, N, H = 9, 8, 3, 12, 5  # 24 padded rows: shard 1 is mostly, shard 2 only, padding
MICROBATCHES = 2


def _syncing_ops() -> dict:
    x = torch.randn(6)
    mask = x > 0
    return {
        "item": lambda: x.sum().item(),
        "int": lambda: int(mask.sum()),
        "bool": lambda: bool(mask.any()),
        "if": lambda: 1 if mask.any() else 0,
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
        "cpu": lambda: x.cpu(),
        "nonzero": lambda: mask.nonzero(),
        "where_one_arg": lambda: torch.where(mask),
        "argwhere": lambda: torch.argwhere(mask),
        "mask_index": lambda: x[mask],
        "mask_assign": lambda: x.clone().index_put_((mask,), torch.zeros(())),
        "masked_select": lambda: x.masked_select(mask),
        "unique": lambda: x.unique(),
        "repeat_interleave": lambda: torch.repeat_interleave(mask.long()),
        "bincount": lambda: torch.bincount(mask.long()),
        "equal": lambda: torch.equal(x, x),
        "tensor_from_host_data": lambda: torch.tensor([1.0, 2.0]),
    }


@pytest.mark.parametrize("name", list(_syncing_ops()))
def test_sync_guard_catches_each_syncing_op(name: str) -> None:
    op = _syncing_ops()[name]
    op()  # runs fine outside the guard
    with pytest.raises(HostSyncError), forbid_host_sync(name):
        op()


def test_sync_guard_lets_device_side_ops_run() -> None:
    """The replacements the passes use, and what CUDA runs without a host round trip."""
    x = torch.randn(6)
    mask = x > 0
    with forbid_host_sync("allowed ops"):
        torch.where(mask, x, 0.0)
        x.masked_fill(~mask, 0.0)
        torch.zeros(3).index_add_(0, mask.long(), x)
        x.clone().scatter_add_(0, mask.long(), x)
        x.masked_scatter(mask, x)  # CUDA sizes it on the device (prefix sum, asynchronous check)
        torch._assert_async(mask.any() | ~mask.any())
        torch.repeat_interleave(torch.ones(2, dtype=torch.long), output_size=2)
        x[mask.long()]  # integer indices
        (mask.sum().clamp_min(1) * 2).to(torch.float32)


def _problem(seed: int, dtype: torch.dtype):
    x, weight, labels = random_problem(N, H, VOCAB, SHARDS, PAD, seed, ignore_every=4)
    return x.to(dtype), weight.to(dtype), labels


def _microbatch(rank, comm, x, w, labels, shard, algo, chunk, store, dst):
    """One microbatch the way the engine runs it: phases issued async, waited later, loss and g made
    from a kept-token count that stays a tensor, T, then the ∇X (alg2: ∇X̂) reduce."""
    state = output_s_pass(x, w, labels, shard, algo, chunk_tokens=chunk, store_softmax=store)
    if algo in ("naive", "interlaced"):
        pending = naive_max_phase(state, comm, async_op=True)
        pending.wait()
        pending = naive_sum_phase(state, comm, async_op=True)
    else:
        pending = stats_phase(state, comm, async_op=True)
    pending.wait()
    xhat = grad_input_phase(state, comm, async_op=True, dst=dst) if algo == "alg2" else None
    kept = (labels != IGNORE_INDEX).sum().clamp_min(1)
    loss = per_token_loss(state).sum() / kept
    g = token_grad(labels, kept * MICROBATCHES)
    grad_x, grad_w = output_t_pass(state, g)
    if xhat is not None:
        xhat.wait()
        grad_x = apply_token_grad(xhat.result, g) if dst in (None, rank) else None
    else:
        dx = dx_phase(grad_x, comm, async_op=True, dst=dst)
        dx.wait()
        grad_x = grad_x if dst in (None, rank) else None
    return loss, grad_x, grad_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("chunk", "store"), [(0, True), (0, False), (5, True), (5, False)])
@pytest.mark.parametrize("algo", ALGOS)
def test_output_layer_passes_run_without_host_sync(algo: str, chunk: int, store: bool, dtype: torch.dtype) -> None:
    x, weight, labels = _problem(1, dtype)
    dst = SHARDS - 1  # the engine reduces ∇X onto the loss rank

    def rank_fn(rank, comm):
        shard = VocabShard.of(VOCAB, SHARDS, rank, pad_to_multiple_of=PAD)
        w = weight[shard.start : shard.end]
        with forbid_host_sync(f"{algo} rank {rank}"):
            engine_like = _microbatch(rank, comm, x, w, labels, shard, algo, chunk, store, dst)
            kept = (labels != IGNORE_INDEX).sum().clamp_min(1)
            composite = output_layer_step(x, w, labels, shard, comm, algo, loss_normalizer=kept,
                                          chunk_tokens=chunk, store_softmax=store, async_op=True)
        return engine_like, composite

    results = run_in_threads(SHARDS, rank_fn)
    kept = int((labels != IGNORE_INDEX).sum())
    g = token_grad(labels, kept * MICROBATCHES)
    expected = ref.output_layer(x.float(), weight.float(), labels, VOCAB, SHARDS, g, pad_to_multiple_of=PAD)
    (loss, grad_x, _), _ = results[dst]
    grad_w = torch.cat([engine_like[2] for engine_like, _ in results])
    pairs = [(loss, expected.per_token_loss.sum() / kept), (grad_x, expected.grad_x), (grad_w, expected.grad_w)]
    pairs += [(composite.loss, pairs[0][1]) for _, composite in results]
    for got, want in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # bf16 GEMM operands, fp32 accumulation and statistics (as tests/unit/test_vocab_layers.py)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dst", [None, 0], ids=["all_reduce", "reduce"])
def test_input_layer_passes_run_without_host_sync(dst, tied: bool) -> None:
    """IF, the embedding reduce, the ∂L/∂embedding broadcast and IB; tied, T adds into the same leaf."""
    x, weight, labels = _problem(2, torch.float32)
    ids = labels.clamp_min(0).reshape(3, 4)
    grad_emb = torch.randn(3, 4, H, generator=torch.Generator().manual_seed(3))
    owner = 0

    def rank_fn(rank, comm):
        shard = VocabShard.of(VOCAB, SHARDS, rank, pad_to_multiple_of=PAD)
        param = weight[shard.start : shard.end].clone().requires_grad_()
        with forbid_host_sync(f"input layer rank {rank}"):
            partial = input_forward(ids, param, shard)
            embed_reduce(partial, comm, dst, async_op=True).wait()
            grad = grad_emb.clone() if rank == owner else torch.empty_like(grad_emb)
            grad_broadcast(grad, comm, owner, async_op=True).wait()
            accumulate_grad(param, input_backward(ids, grad, shard))
            if tied:
                state = output_s_pass(x, param.detach(), labels, shard, "alg1")
                stats_phase(state, comm, async_op=True).wait()
                accumulate_grad(param, output_t_pass(state, token_grad(labels, N))[1])
        return partial, param.grad

    results = run_in_threads(SHARDS, rank_fn)
    emb_ref, grad_ref = ref.input_layer(ids, weight, VOCAB, SHARDS, grad_emb, pad_to_multiple_of=PAD)
    if tied:
        grad_ref = grad_ref + ref.output_layer(x, weight, labels, VOCAB, SHARDS, token_grad(labels, N),
                                               pad_to_multiple_of=PAD).grad_w
    torch.testing.assert_close(results[owner][0], emb_ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([gw for _, gw in results]), grad_ref, rtol=1e-5, atol=1e-6)


def _tiny_config(precision: str):
    from vptrain.config import RunConfig

    overrides = {"layout.pp": 1, "method.name": "baseline", "model.vocab_size": 61, "model.hidden_size": 16,
                 "model.num_heads": 2, "model.num_layers": 2, "model.seq_len": 8, "precision": precision}
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(
        [f"{k}={v}" for k, v in overrides.items()]), {"run_dir": "unused"})
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_process_forward_backward_run_without_host_sync(precision: str) -> None:
    """The reference trainer's F and B (the plain pipeline's lm_loss) leave the loss on the device."""
    from vptrain.engine.single import SingleProcessTrainer
    from vptrain.model import lm_loss

    trainer = SingleProcessTrainer(_tiny_config(precision), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    micro = [(torch.randint(0, 61, (2, 8), generator=gen), torch.randint(0, 61, (2, 8), generator=gen))
             for _ in range(MICROBATCHES)]
    micro[1][1][0, :3] = IGNORE_INDEX
    with forbid_host_sync("single-process F and B"):
        total = trainer.forward_backward(micro)
    assert total.dtype == torch.float64 and total.dim() == 0
    assert all(p.grad is not None for p in trainer.model.parameters())
    with torch.no_grad(), trainer._autocast():
        expected = sum(lm_loss(trainer.model(t), y).double() for t, y in micro) / MICROBATCHES
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("chunk", "store"), [(0, True), (5, False)])
def test_one_shard_output_layer_runs_without_host_sync(chunk: int, store: bool, dtype: torch.dtype) -> None:
    """baseline / redis's last stage: the vocabulary kernel on one shard, forward and loss.backward()."""
    from vptrain.vocab.one_shard import OneShardLoss

    x, weight, labels = _problem(5, dtype)
    rows = VocabShard.of(VOCAB, 1, 0, pad_to_multiple_of=PAD).rows  # the whole table is the one shard
    x, weight = x.clone().requires_grad_(), weight[:rows].clone().requires_grad_()
    loss_fn = OneShardLoss(VOCAB, chunk_tokens=chunk, store_softmax=store)
    with forbid_host_sync("one-shard output layer"):
        loss = loss_fn((x, weight), labels)
        (loss / MICROBATCHES).backward()
    kept = int((labels != IGNORE_INDEX).sum())
    expected = ref.output_layer(x.detach().float(), weight.detach().float(), labels, VOCAB, 1,
                                token_grad(labels, kept * MICROBATCHES), pad_to_multiple_of=PAD)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(loss.detach(), expected.per_token_loss.sum() / kept, **tol)
    torch.testing.assert_close(x.grad.float(), expected.grad_x, **tol)
    torch.testing.assert_close(weight.grad.float(), expected.grad_w, **tol)
