"""A Llama written as a flat list of pipeline layers, as plain as gpt.py beside it.

Pre-RMSNorm blocks, grouped-query causal attention with rotary position embeddings, a SwiGLU MLP,
no biases and no position table; the input and output embeddings may be tied. Parameter names and
conventions follow Hugging Face's LlamaForCausalLM (modeling_llama.py), so a HF checkpoint maps
onto this one tensor for tensor:

    model.embed_tokens.weight                  0.wte (the vocabulary tables: vptrain/vocab)
    model.layers.{i}.input_layernorm.weight    {i+1}.input_layernorm.weight
    model.layers.{i}.self_attn.q_proj.weight   {i+1}.self_attn.q_proj.weight (k_proj, v_proj, o_proj alike)
    model.layers.{i}.post_attention_layernorm  {i+1}.post_attention_layernorm.weight
    model.layers.{i}.mlp.gate_proj.weight      {i+1}.mlp.gate_proj.weight (up_proj, down_proj alike)
    model.norm.weight                          {L+1}.norm.weight
    lm_head.weight                             {L+2}.weight

Rotary embeddings rotate the two halves of each head (HF's rotate_half), with the frequencies
theta^(-2j/d) computed in fp32 (fp64 in an fp64 model), as HF does. Initialisation is vptrain's
own (HF checkpoints bring theirs): N(0, init_std) projections, residual projections (o_proj,
down_proj) N(0, init_std / sqrt(2L)), norms one; every tensor seeded by its name.

Shapes: B batch, T sequence, C hidden, V vocabulary rows (padded), nh heads, nkv key/value heads,
hs head size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vptrain import init
from vptrain.models.recompute import RecomputedLayer
from vptrain.models.shape import LayerList, OutputHead, OutputLayer, TransformerShape, token_embedding_rows

RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in at least fp32 (HF's LlamaRMSNorm)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(seq: int, head_dim: int, theta: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position t times frequency j, (T, hs), both halves of the head alike."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=like.device, dtype=dtype) / head_dim)
    freqs = torch.outer(torch.arange(seq, device=like.device, dtype=dtype), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        C, hs = shape.hidden_size, shape.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.kv_heads, hs
        self.theta = shape.rope_theta
        self.q_proj = nn.Linear(C, self.num_heads * hs, bias=False)
        self.k_proj = nn.Linear(C, self.num_kv_heads * hs, bias=False)
        self.v_proj = nn.Linear(C, self.num_kv_heads * hs, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hs, C, bias=False)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before o_proj: (B, T, C) -> the heads' outputs side by side (B, T, nh * hs)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(T, self.head_dim, self.theta, q)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.num_heads // self.num_kv_heads  # query heads per key/value head, adjacent (HF's repeat_kv)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.core(x))


class MLP(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        C, inner = shape.hidden_size, shape.intermediate_size
        self.gate_proj = nn.Linear(C, inner, bias=False)
        self.up_proj = nn.Linear(C, inner, bias=False)
        self.down_proj = nn.Linear(inner, C, bias=False)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(x))


class Block(RecomputedLayer):
    """One transformer layer, its pieces as recompute.py names them (activation checkpointing).
    `index` only names the init stream."""

    def __init__(self, shape: TransformerShape, index: int):
        super().__init__(shape.activation_checkpointing)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.mlp = MLP(shape)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = shape.proj_std if name.endswith(RESIDUAL_PROJECTIONS) else shape.init_std
                init.normal_(mod.weight, seed=shape.seed, name=f"block{index}.{name}.weight", std=std)

    def attention_core(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attn.core(self.input_layernorm(x))

    def attention_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.self_attn.o_proj(y)

    def mlp_activation(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.activation(self.post_attention_layernorm(h))

    def mlp_out(self, a: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(a)


class InputEmbedding(nn.Module):
    """The token embedding on one stage (baseline placement): ids (B, T) -> (B, T, C)."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.wte = nn.Parameter(token_embedding_rows(shape, 0, shape.vocab_rows))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.wte)


class Embedded(nn.Module):
    """The first layer under a vocab method, where the sharded embedding already ran: positions
    enter in every attention (rotary), so there is nothing to add. Keeps the layer indices
    (and so the parameter names) of the single-process model."""

    def __init__(self, shape: TransformerShape):
        super().__init__()

    def forward(self, tok_emb: torch.Tensor) -> torch.Tensor:
        return tok_emb


class FinalNorm(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.norm = RMSNorm(shape.hidden_size, shape.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def layer_list(shape: TransformerShape, *, with_vocab: bool = True, head: type[nn.Module] = OutputLayer) -> LayerList:
    """The pipeline layers as (class, args) pairs, in order, as gpt.layer_list:
    with_vocab=True [InputEmbedding, Block x L, FinalNorm, head]; with_vocab=False (vocab methods)
    [Embedded, Block x L, FinalNorm], the vocabulary tables sharded outside the list."""
    layers: LayerList = [(InputEmbedding, (shape,)) if with_vocab else (Embedded, (shape,))]
    layers += [(Block, (shape, i)) for i in range(shape.num_layers)]
    layers.append((FinalNorm, (shape,)))
    if with_vocab:
        layers.append((head, (shape,)))
    return layers


class Llama(nn.Sequential):
    """The whole model in one process (layout.pp=1), the oracle every llama pipeline is compared with."""

    def __init__(self, shape: TransformerShape):
        super().__init__(*[cls(*args) for cls, args in layer_list(shape, head=OutputHead)])
        if shape.tie_embeddings:
            self[-1].weight = self[0].wte  # one tensor; its gradient sums both uses
