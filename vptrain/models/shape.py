"""What every architecture shares: the shape, the vocabulary tables and the output layers.

The vocabulary tables are drawn in seeded blocks of rows (vptrain.init.vocab_rows), so a shard
builds only its own rows and any layout starts from the single-process model's weights. The
output layers hold a V x C weight and nothing architecture-specific: gpt.py and llama.py both end
their layer lists with them.

Shapes: B batch, T sequence, C hidden, V vocabulary rows (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vptrain import init
from vptrain.config import DEFAULT_ROPE_THETA


@dataclass(frozen=True)
class TransformerShape:
    vocab_size: int  # real tokens
    vocab_rows: int  # padded rows of the embedding / output tables
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_len: int  # rows of the GPT's position table (llama has none)
    init_std: float
    seed: int
    tie_embeddings: bool = False
    arch: str = "gpt"
    norm_eps: float = 1e-5
    num_kv_heads: int = 0  # llama: grouped-query attention (0: num_heads)
    intermediate_size: int = 0  # llama: SwiGLU width
    rope_theta: float = DEFAULT_ROPE_THETA  # llama
    activation_checkpointing: str = "none"  # none | full | selective: what each layer recomputes (recompute.py)

    @property
    def proj_std(self) -> float:
        """Residual projections are scaled down with depth (GPT-2's rule; llama keeps it)."""
        return self.init_std / math.sqrt(2 * self.num_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


def token_embedding_rows(shape: TransformerShape, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the input embedding table (a vocab shard builds only its own)."""
    return init.vocab_rows(
        shape.vocab_size, shape.hidden_size, start, end, seed=shape.seed, name="wte", std=shape.init_std
    )


def output_weight_rows(shape: TransformerShape, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the output layer's V x C weight."""
    return init.vocab_rows(
        shape.vocab_size, shape.hidden_size, start, end, seed=shape.seed, name="lm_head", std=shape.init_std
    )


class OutputHead(nn.Module):
    """h -> V projection on one stage (the single-process model); padded rows are cut before the loss."""

    def __init__(self, shape: TransformerShape):
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
    as OutputHead, so its state matches the single-process model's."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.weight = nn.Parameter(output_weight_rows(shape, 0, shape.vocab_rows))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.weight


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of one microbatch, computed in fp32: the single-process oracle's loss."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


LayerList = list[tuple[type[nn.Module], tuple]]
