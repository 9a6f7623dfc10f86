"""The sharded vocabulary math run shard by shard in one process: a test oracle and a teaching aid.

No communicator and no buffers: each step is a plain loop over the shards, written to be read next to
vp_algorithms.md §2-§3. "Communication" is an explicit merge over the per-shard results. Everything
is fp32. The production passes (output.py, embedding.py) are checked against this, and this is
checked against F.cross_entropy / F.embedding.

    per shard r:   Z_r = X W_rᵀ   m_r = max Z_r   s_r = Σ exp(Z_r - m_r)   P_r = exp(Z_r - m_r) / s_r
    merge:         M = max_r m_r   S_tot = Σ_r s_r exp(m_r - M)   Z_y = the owner's Z[n, y_n]
    loss:          ℓ_n = log S_tot + M - Z_y
    rescale:       α_r = s_r exp(m_r - M) / S_tot,  α_r P_r = softmax(Z)[:, V_r]   (the identity)
    gradients:     D_r = g (α_r P_r - onehot_r)   ∇X = Σ_r D_r W_r   ∇W_r = D_rᵀ X
    alg2's form:   ∇X̂ = Σ_r (α_r P_r W_r - W_r[y])   (∇X = g ∇X̂, computable before g exists)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vptrain.vocab.shard import IGNORE_INDEX, VocabShard


@dataclass(frozen=True)
class ShardStats:
    """What shard r knows after its local pass (the S pass of alg1)."""

    shard: VocabShard
    local_max: torch.Tensor  # [N], -inf for a padding-only shard
    local_sum: torch.Tensor  # [N]
    local_softmax: torch.Tensor  # [N, real_rows]: softmax over this shard's real rows only
    target_logit: torch.Tensor  # [N]: Z[n, y_n] where this shard owns y_n, else 0
    owned: torch.Tensor  # [N] bool


def shards_of(vocab_size: int, num_shards: int, pad_to_multiple_of: int = 1) -> list[VocabShard]:
    return [VocabShard.of(vocab_size, num_shards, r, pad_to_multiple_of=pad_to_multiple_of) for r in range(num_shards)]


def local_stats(x: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, shard: VocabShard) -> ShardStats:
    """Shard r's local statistics; only its real rows exist as far as the softmax is concerned."""
    real = weight_shard[: shard.real_rows].float()
    logits = x.float() @ real.t()
    n = x.shape[0]
    if shard.real_rows == 0:
        local_max = torch.full((n,), float("-inf"))
        local_sum = torch.zeros(n)
        softmax = logits  # [N, 0]
    else:
        local_max = logits.max(dim=1).values
        exps = torch.exp(logits - local_max[:, None])
        local_sum = exps.sum(dim=1)
        softmax = exps / local_sum[:, None]
    local, owned = shard.localize(labels)
    target_logit = torch.zeros(n)
    for i in range(n):  # per token, as the math is written: only the owner knows Z[n, y_n]
        if owned[i]:
            target_logit[i] = logits[i, local[i]]
    return ShardStats(shard, local_max, local_sum, softmax, target_logit, owned)


def merge_stats(stats: list[ShardStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, S_tot, Z_y): what the statistics barrier gives every rank."""
    gmax = torch.stack([s.local_max for s in stats]).max(dim=0).values
    gsum = sum(s.local_sum * torch.exp(s.local_max - gmax) for s in stats)
    target = sum(s.target_logit for s in stats)
    return gmax, gsum, target  # type: ignore[return-value]


def rescale_factor(stats: ShardStats, gmax: torch.Tensor, gsum: torch.Tensor) -> torch.Tensor:
    """α_r [N]: α_r · local_softmax_r is the global softmax restricted to shard r's rows."""
    return stats.local_sum * torch.exp(stats.local_max - gmax) / gsum


@dataclass(frozen=True)
class ReferenceOutput:
    per_token_loss: torch.Tensor  # [N], 0 for ignored tokens
    grad_x: torch.Tensor  # [N, h] = g ⊙ grad_x_hat
    grad_x_hat: torch.Tensor  # [N, h] alg2's g-free input gradient (0 rows for ignored tokens)
    grad_w: torch.Tensor  # [vocab_rows, h], padding rows 0
    shards: list[VocabShard]


def output_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_shards: int,
    g: torch.Tensor,
    *,
    pad_to_multiple_of: int = 1,
) -> ReferenceOutput:
    """Sharded output layer on the full padded table weight [vocab_rows, h], for upstream grad g [N]."""
    shards = shards_of(vocab_size, num_shards, pad_to_multiple_of)
    if weight.shape[0] != shards[-1].end:
        raise ValueError(f"weight has {weight.shape[0]} rows, the padded vocabulary {shards[-1].end}")
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    g = torch.where(valid, g.float(), 0.0)
    xf = x.float()
    stats = [local_stats(x, weight[s.start : s.end], labels, s) for s in shards]
    gmax, gsum, target = merge_stats(stats)
    loss = torch.where(valid, torch.log(gsum) + gmax - target, 0.0)

    grad_x = torch.zeros_like(xf)
    grad_x_hat = torch.zeros_like(xf)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32)
    for st in stats:
        s = st.shard
        real = weight[s.start : s.start + s.real_rows].float()
        softmax = rescale_factor(st, gmax, gsum)[:, None] * st.local_softmax
        onehot = torch.zeros_like(softmax)
        local, owned = s.localize(labels)
        onehot[owned, local[owned]] = 1.0
        d = g[:, None] * (softmax - onehot)
        grad_x += d @ real
        grad_w[s.start : s.start + s.real_rows] = d.t() @ xf
        # alg2: the same ∇X without g, from the shard's softmax product and its target rows.
        target_rows = torch.where(owned[:, None], weight[s.start : s.end][local].float(), 0.0)
        grad_x_hat += softmax @ real - target_rows
    grad_x_hat = torch.where(valid[:, None], grad_x_hat, 0.0)
    return ReferenceOutput(loss, grad_x, grad_x_hat, grad_w, shards)


def input_layer(
    ids: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: int,
    num_shards: int,
    grad_emb: torch.Tensor,
    *,
    pad_to_multiple_of: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [..., h], ∇weight [vocab_rows, h]) of the sharded input layer, shard by shard."""
    shards = shards_of(vocab_size, num_shards, pad_to_multiple_of)
    hidden = weight.shape[1]
    emb = torch.zeros(*ids.shape, hidden)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32)
    flat_ids, flat_grad = ids.reshape(-1), grad_emb.reshape(-1, hidden).float()
    for s in shards:
        local, owned = s.localize(ids)
        part = torch.where(owned[..., None], weight[s.start : s.end][local].float(), 0.0)
        emb += part  # the "reduce": exactly one shard contributes per token
        for i in range(flat_ids.shape[0]):  # scatter-add, one token at a time
            if s.start <= flat_ids[i] < s.start + s.real_rows:
                grad_w[flat_ids[i]] += flat_grad[i]
    return emb, grad_w
