"""A GPT written as a flat list of pipeline layers, as plain as nanoGPT's model.py.

Pre-LayerNorm blocks, causal attention through `scaled_dot_product_attention`, a 4h GELU MLP,
learned position embeddings and untied input/output embeddings (tied ones are an option). The
model knows nothing about parallelism: `layer_list` returns the pieces, and the engine decides
which stage builds which. Every piece initialises itself from (seed, its name) so any layout
starts from identical weights.

Shapes: B batch, T sequence, C hidden, V vocabulary rows (padded).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vptrain import init
from vptrain.models.recompute import RecomputedLayer
from vptrain.models.shape import LayerList, OutputHead, OutputLayer, TransformerShape, token_embedding_rows


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.num_heads = shape.num_heads
        self.qkv = nn.Linear(shape.hidden_size, 3 * shape.hidden_size)
        self.proj = nn.Linear(shape.hidden_size, shape.hidden_size)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the output projection: (B, T, C) -> the heads' outputs side by side."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.core(x))


class MLP(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.fc = nn.Linear(shape.hidden_size, 4 * shape.hidden_size)
        self.proj = nn.Linear(4 * shape.hidden_size, shape.hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(x))


class Block(RecomputedLayer):
    """One transformer layer, its pieces as recompute.py names them (activation checkpointing).
    `index` only names the init stream."""

    def __init__(self, shape: TransformerShape, index: int):
        super().__init__(shape.activation_checkpointing)
        self.ln_1 = nn.LayerNorm(shape.hidden_size, eps=shape.norm_eps)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.hidden_size, eps=shape.norm_eps)
        self.mlp = MLP(shape)
        init.init_module(self, seed=shape.seed, prefix=f"block{index}", std=shape.init_std, proj_std=shape.proj_std)

    def attention_core(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.core(self.ln_1(x))

    def attention_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.attn.proj(y)

    def mlp_activation(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.activation(self.ln_2(h))

    def mlp_out(self, a: torch.Tensor) -> torch.Tensor:
        return self.mlp.proj(a)


class PositionEmbedding(nn.Module):
    """Adds learned position embeddings to already-looked-up token embeddings (B, T, C)."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.wpe = nn.Parameter(torch.empty(shape.seq_len, shape.hidden_size))
        init.normal_(self.wpe.data, seed=shape.seed, name="wpe", std=shape.init_std)

    def forward(self, tok_emb: torch.Tensor) -> torch.Tensor:
        return tok_emb + self.wpe[: tok_emb.shape[1]].to(tok_emb.dtype)


class InputEmbedding(nn.Module):
    """Token + position embedding on one stage (baseline placement): ids (B, T) -> (B, T, C)."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.wte = nn.Parameter(token_embedding_rows(shape, 0, shape.vocab_rows))
        self.pos = PositionEmbedding(shape)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pos(F.embedding(idx, self.wte))


class FinalNorm(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.ln_f = nn.LayerNorm(shape.hidden_size, eps=shape.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


def layer_list(shape: TransformerShape, *, with_vocab: bool = True, head: type[nn.Module] = OutputLayer) -> LayerList:
    """The pipeline layers as (class, args) pairs, in order.

    with_vocab=True (baseline/redis): [InputEmbedding, Block x L, FinalNorm, head]; the pipeline's
    head is OutputLayer (loss: OneShardLoss), the single-process GPT's OutputHead (loss: lm_loss).
    with_vocab=False (vocab methods): [PositionEmbedding, Block x L, FinalNorm]; the token embedding
    and output layer are sharded outside the list.
    """
    first = (InputEmbedding, (shape,)) if with_vocab else (PositionEmbedding, (shape,))
    layers: LayerList = [first]
    layers += [(Block, (shape, i)) for i in range(shape.num_layers)]
    layers.append((FinalNorm, (shape,)))
    if with_vocab:
        layers.append((head, (shape,)))
    return layers


class GPT(nn.Sequential):
    """The whole model in one process (the reference layout, layout.pp=1): logits from OutputHead
    and `F.cross_entropy` (lm_loss), the oracle every pipeline is compared with."""

    def __init__(self, shape: TransformerShape):
        super().__init__(*[cls(*args) for cls, args in layer_list(shape, head=OutputHead)])
        if shape.tie_embeddings:
            self[-1].weight = self[0].wte  # one tensor; its gradient sums both uses
