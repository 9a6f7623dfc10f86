"""The output layer of the plain pipeline (baseline, redis): the vocabulary kernel on one shard.

Every method a benchmark compares must run the same kernel for the same math (DESIGN.md invariant
9), so baseline and redis do not call `F.cross_entropy` on materialised logits: their last stage
runs S, the statistics merge and T of the vocabulary layer with the whole (padded) table as its
only shard, wrapped in an autograd Function so DeepSpeed's `loss.backward()` reaches it. The
statistics go through `stats_phase` on a one-rank communicator, so the merge is the sharded code
path itself (max over one shard, exp(0) rescale), not a re-derivation of it.

Only the single-process reference (layout.pp=1) keeps `F.cross_entropy`: it is the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vptrain.vocab.comm import Done, Work
from vptrain.vocab.grads import token_grad
from vptrain.vocab.output import output_s_pass, output_t_pass, per_token_loss
from vptrain.vocab.output_phases import stats_phase
from vptrain.vocab.shard import IGNORE_INDEX, VocabShard

ALGO = "alg1"
"""One shard: S already forms the whole softmax's statistics, so alg1's single merge is all there
is; alg2's A = softmax·W would be a fourth GEMM that one shard does not need (T gives ∇X)."""


class SoloComm:
    """The Communicator of a group of one rank: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> Work:
        return Done()

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False) -> Work:
        output[0].copy_(tensor)
        return Done()

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Work:
        return Done()

    def reduce(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Work:
        return Done()


def kept_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that count in the mean, as a 0-dim device tensor (never read on the host), at least 1:
    a microbatch with every label ignored has loss 0 and no gradient, where F.cross_entropy's 0/0
    gives NaN. The vocabulary engine normalises the same way."""
    return (labels.reshape(-1) != IGNORE_INDEX).sum().clamp_min(1)


class _OneShardOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size: int, chunk_tokens: int, store_softmax: bool):
        labels = labels.reshape(-1)
        shard = VocabShard(0, weight.shape[0], vocab_size)
        state = output_s_pass(x.reshape(-1, x.shape[-1]), weight, labels, shard, ALGO,
                              chunk_tokens=chunk_tokens, store_softmax=store_softmax)
        stats_phase(state, SoloComm())
        kept = kept_tokens(labels)
        ctx.state, ctx.kept, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = state, kept, x.shape, x.dtype, weight.dtype
        ctx.save_for_backward(labels)
        return per_token_loss(state).sum() / kept

    @staticmethod
    def backward(ctx, grad_loss):
        (labels,) = ctx.saved_tensors
        # g_n = ∂L/∂ℓ_n: the masked mean's closed form times the upstream gradient (1/GAS, loss scale).
        g = token_grad(labels, ctx.kept) * grad_loss.to(torch.float32)
        grad_x, grad_w = output_t_pass(ctx.state, g)
        ctx.state = None  # T freed the fp32 buffer; drop the rest of the state with it
        return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), grad_w.to(ctx.w_dtype), None, None, None, None


def one_shard_output_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    *,
    chunk_tokens: int = 0,
    store_softmax: bool = True,
) -> torch.Tensor:
    """Token-mean cross-entropy of x [..., h] against the padded table weight [rows, h] (rows past
    vocab_size are padding), labels [...] with IGNORE_INDEX for masked tokens. fp32 scalar."""
    return _OneShardOutputLoss.apply(x, weight, labels, vocab_size, chunk_tokens, store_softmax)


@dataclass(frozen=True)
class OneShardLoss:
    """The pipeline's loss_fn: takes the last layer's (hidden state, output weight) pair."""

    vocab_size: int
    chunk_tokens: int = 0
    store_softmax: bool = True

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        x, weight = outputs
        return one_shard_output_loss(x, weight, labels, self.vocab_size, chunk_tokens=self.chunk_tokens,
                                     store_softmax=self.store_softmax)
