"""A GPT written as a flat list of pipeline layers, as plain as nanoGPT's model.py.

Pre-LayerNorm blocks, causal attention through `scaled_dot_product_attention`, a 4h GELU MLP,
learned position embeddings and untied input/output embeddings (tied ones are a vocab-method
option). The model knows nothing about parallelism: `layer_list` returns the pieces, and the engine
decides which stage builds which. Every piece initialises itself from (seed, its name) so any
layout starts from identical weights.

Shapes: B batch, T sequence, C hidden, V vocabulary rows (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vptrain import init


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int  # real tokens
    vocab_rows: int  # padded rows of the embedding / output tables
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_len: int
    init_std: float
    seed: int
    tie_embeddings: bool = False

    @property
    def proj_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.num_layers)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.num_heads = shape.num_heads
        self.qkv = nn.Linear(shape.hidden_size, 3 * shape.hidden_size)
        self.proj = nn.Linear(shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.fc = nn.Linear(shape.hidden_size, 4 * shape.hidden_size)
        self.proj = nn.Linear(4 * shape.hidden_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One transformer layer. `index` only names the init stream."""

    def __init__(self, shape: GPTShape, index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.hidden_size)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.hidden_size)
        self.mlp = MLP(shape)
        init.init_module(self, seed=shape.seed, prefix=f"block{index}", std=shape.init_std, proj_std=shape.proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def token_embedding_rows(shape: GPTShape, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the input embedding table (a vocab shard builds only its own)."""
    return init.vocab_rows(
        shape.vocab_size, shape.hidden_size, start, end, seed=shape.seed, name="wte", std=shape.init_std
    )


def output_weight_rows(shape: GPTShape, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the output layer's V x C weight."""
    return init.vocab_rows(
        shape.vocab_size, shape.hidden_size, start, end, seed=shape.seed, name="lm_head", std=shape.init_std
    )


class PositionEmbedding(nn.Module):
    """Adds learned position embeddings to already-looked-up token embeddings (B, T, C)."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.wpe = nn.Parameter(torch.empty(shape.seq_len, shape.hidden_size))
        init.normal_(self.wpe.data, seed=shape.seed, name="wpe", std=shape.init_std)

    def forward(self, tok_emb: torch.Tensor) -> torch.Tensor:
        return tok_emb + self.wpe[: tok_emb.shape[1]].to(tok_emb.dtype)


class InputEmbedding(nn.Module):
    """Token + position embedding on one stage (baseline placement): ids (B, T) -> (B, T, C)."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.wte = nn.Parameter(token_embedding_rows(shape, 0, shape.vocab_rows))
        self.pos = PositionEmbedding(shape)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pos(F.embedding(idx, self.wte))


class FinalNorm(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln_f = nn.LayerNorm(shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class OutputHead(nn.Module):
    """h -> V projection on one stage (baseline placement); padded rows are cut before the loss."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.vocab_size = shape.vocab_size
        self.weight = nn.Parameter(output_weight_rows(shape, 0, shape.vocab_rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)[..., : self.vocab_size]  # (B, T, V)


class OutputLayer(nn.Module):
    """The output layer on the plain pipeline's last stage (baseline, redis): it holds the weight and
    hands (h, W) to the loss function, `vptrain.vocab.one_shard.OneShardLoss`, which computes logits,
    softmax cross-entropy and their gradients with the vocabulary kernel on one shard, as every
    vocabulary method does on its shards (DESIGN.md invariant 9). Same parameter name, rows and init
    as OutputHead, so its state matches the single-process GPT's."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.weight = nn.Parameter(output_weight_rows(shape, 0, shape.vocab_rows))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.weight


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of one microbatch, computed in fp32: the single-process oracle's loss."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def layer_list(
    shape: GPTShape, *, with_vocab: bool = True, head: type[nn.Module] = OutputLayer
) -> list[tuple[type[nn.Module], tuple]]:
    """The pipeline layers as (class, args) pairs, in order.

    with_vocab=True (baseline/redis): [InputEmbedding, Block x L, FinalNorm, head]; the pipeline's
    head is OutputLayer (loss: OneShardLoss), the single-process GPT's OutputHead (loss: lm_loss).
    with_vocab=False (vocab methods): [PositionEmbedding, Block x L, FinalNorm]; the token embedding
    and output layer are sharded outside the list.
    """
    first = (InputEmbedding, (shape,)) if with_vocab else (PositionEmbedding, (shape,))
    layers: list[tuple[type[nn.Module], tuple]] = [first]
    layers += [(Block, (shape, i)) for i in range(shape.num_layers)]
    layers.append((FinalNorm, (shape,)))
    if with_vocab:
        layers.append((head, (shape,)))
    return layers


class GPT(nn.Sequential):
    """The whole model in one process (the reference layout, layout.pp=1): logits from OutputHead
    and `F.cross_entropy` (lm_loss), the oracle every pipeline is compared with."""

    def __init__(self, shape: GPTShape):
        super().__init__(*[cls(*args) for cls, args in layer_list(shape, head=OutputHead)])
        if shape.tie_embeddings:
            self[-1].weight = self[0].wte  # one tensor; its gradient sums both uses
