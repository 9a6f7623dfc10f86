"""Equal kernels (DESIGN.md invariant 9): the plain pipeline's output layer is the vocabulary kernel
on one shard, and it computes what `F.cross_entropy` on the logits does.

The kernel works in fp32 (logits, statistics, softmax, gradients); the oracle here is
F.cross_entropy in fp64 on the same values, so the tolerances are fp32 rounding bounds: a length-n
dot product or sum is within n·eps of the exact one (relative to its magnitude), and the longest
such chains are the logits (h), the softmax denominator (V) and ∇W (the N tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _vocab_problems import random_problem

from vptrain.model import GPT, GPTShape, OutputHead, OutputLayer, layer_list
from vptrain.vocab import IGNORE_INDEX, VocabShard, output_layer_step
from vptrain.vocab.one_shard import OneShardLoss, SoloComm, kept_tokens, one_shard_output_loss

BATCH, SEQ, H, VOCAB, PAD = 3, 8, 16, 37, 8  # 40 padded rows, 3 of them padding (holding garbage)
N = BATCH * SEQ
EPS32 = torch.finfo(torch.float32).eps
FP32_BOUND = (H + VOCAB + N) * EPS32
UPSTREAM = 0.37  # a loss scale / 1/GAS factor the backward must carry through


def _problem(seed: int, dtype: torch.dtype = torch.float32):
    x, weight, labels = random_problem(N, H, VOCAB, 1, PAD, seed, ignore_every=5)
    return x.reshape(BATCH, SEQ, H).to(dtype), weight.to(dtype), labels.reshape(BATCH, SEQ)


def _oracle(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """F.cross_entropy on the logits in fp64: (loss, ∇x, ∇W) of UPSTREAM * loss."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(x64, w64)[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
    (UPSTREAM * loss).backward()
    return loss.detach(), x64.grad, w64.grad


def _kernel(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **options):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = one_shard_output_loss(x, weight, labels, VOCAB, **options)
    (UPSTREAM * loss).backward()
    return loss.detach(), x.grad, weight.grad, loss


def _close(got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    torch.testing.assert_close(got.double(), want, rtol=bound, atol=bound * want.abs().max().item())


@pytest.mark.parametrize(("chunk", "store"), [(0, True), (0, False), (5, True), (7, False)])
def test_one_shard_loss_equals_cross_entropy(chunk: int, store: bool) -> None:
    x, weight, labels = _problem(1)
    loss, grad_x, grad_w, _ = _kernel(x, weight, labels, chunk_tokens=chunk, store_softmax=store)
    want = _oracle(x, weight, labels)
    for got, expected in zip((loss, grad_x, grad_w), want, strict=True):
        _close(got, expected, FP32_BOUND)
    assert torch.count_nonzero(grad_w[VOCAB:]) == 0  # padding rows: no logit, no gradient
    assert torch.count_nonzero(grad_x.reshape(N, H)[labels.reshape(-1) == IGNORE_INDEX]) == 0  # ignored tokens


def test_one_shard_loss_is_the_vocabulary_kernel() -> None:
    """Bit for bit what the vocabulary layer's own single-process composition computes on one shard,
    through an autograd node of its own (not an F.cross_entropy graph)."""
    x, weight, labels = _problem(2)
    loss, grad_x, grad_w, graph = _kernel(x, weight, labels)
    assert type(graph.grad_fn).__name__ == "_OneShardOutputLossBackward"
    shard = VocabShard(0, weight.shape[0], VOCAB)
    kept = kept_tokens(labels)
    direct = output_layer_step(x.reshape(N, H), weight, labels.reshape(-1), shard, SoloComm(), "alg1",
                               loss_normalizer=kept, loss_scale=UPSTREAM)
    torch.testing.assert_close(loss, direct.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_x.reshape(N, H), direct.grad_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_w, direct.grad_w, rtol=0, atol=0)


def test_pipeline_head_runs_the_kernel_and_the_oracle_keeps_cross_entropy() -> None:
    shape = GPTShape(vocab_size=VOCAB, vocab_rows=VOCAB + 3, num_layers=1, hidden_size=H, num_heads=2,
                     seq_len=SEQ, init_std=0.02, seed=3)
    head_cls, args = layer_list(shape)[-1]
    assert head_cls is OutputLayer
    head, reference = head_cls(*args), GPT(shape)[-1]
    assert isinstance(reference, OutputHead)
    torch.testing.assert_close(head.weight, reference.weight, rtol=0, atol=0)  # same name, rows and init
    x = torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    loss = OneShardLoss(VOCAB)(head(x), labels)
    assert type(loss.grad_fn).__name__ == "_OneShardOutputLossBackward"
    want = F.cross_entropy(F.linear(x.double(), reference.weight.double())[..., :VOCAB].reshape(-1, VOCAB),
                           labels.reshape(-1))
    _close(loss.detach(), want.detach(), FP32_BOUND)


def test_one_shard_loss_bf16() -> None:
    """bf16 operands, fp32 accumulation and statistics; the oracle sees the same bf16 values in fp64.
    The loss is fp32 (fp32 bound); the gradients are returned in the operands' dtype (bf16 rounding)."""
    x, weight, labels = _problem(6, torch.bfloat16)
    loss, grad_x, grad_w, _ = _kernel(x, weight, labels)
    assert loss.dtype == torch.float32 and grad_x.dtype == grad_w.dtype == torch.bfloat16
    want_loss, want_x, want_w = _oracle(x, weight, labels)
    _close(loss, want_loss, FP32_BOUND)
    bf16 = torch.finfo(torch.bfloat16).eps + FP32_BOUND
    _close(grad_x, want_x, bf16)
    _close(grad_w, want_w, bf16)


def test_one_shard_loss_with_a_tied_weight() -> None:
    """A weight that is also the input embedding gets the sum of both uses' gradients."""
    x, weight, labels = _problem(7)
    ids = labels.clamp_min(0)

    def grads(loss_of):
        w = weight.clone().double().requires_grad_() if loss_of is None else weight.clone().requires_grad_()
        hidden = F.embedding(ids, w) + x.to(w.dtype)
        if loss_of is None:
            loss = F.cross_entropy(F.linear(hidden, w)[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
        else:
            loss = loss_of(hidden, w)
        loss.backward()
        return w.grad

    got = grads(lambda hidden, w: one_shard_output_loss(hidden, w, labels, VOCAB))
    _close(got, grads(None), FP32_BOUND)


def test_every_label_ignored_gives_zero_loss_and_no_gradient() -> None:
    """Where F.cross_entropy's mean is 0/0 (NaN), the kernel's is 0, as in the vocabulary engine."""
    x, weight, _ = _problem(8)
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
    loss, grad_x, grad_w, _ = _kernel(x, weight, labels)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_x) == 0 and torch.count_nonzero(grad_w) == 0
