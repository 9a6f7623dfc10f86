"""The vocabulary-parallel input layer (token embedding), sharded by rows like the output layer.

IF: every rank looks up the tokens it owns and writes zeros for the others; summing the partial
embeddings over the ranks (embed_reduce) gives the full lookup, exactly, since each token has
exactly one non-zero contribution. IB: the rank that ran the first transformer block broadcasts
∂L/∂embedding (grad_broadcast) and every rank scatter-adds the rows of the tokens it owns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vptrain.vocab.comm import Communicator, Pending
from vptrain.vocab.shard import VocabShard


def _owned_ids(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    # Ids outside [0, vocab_size) would be owned by no shard and silently embed to zero.
    torch._assert_async(((ids >= 0) & (ids < shard.vocab_size)).all())
    return shard.localize(ids)


@torch.no_grad()
def input_forward(ids: torch.Tensor, weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """IF: [...] token ids -> [..., h] rows of this shard, zeros where another shard owns the id."""
    if weight.dim() != 2 or weight.shape[0] != shard.rows:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit shard rows={shard.rows}")
    local, owned = _owned_ids(ids, shard)
    out = F.embedding(local, weight.detach())
    return out.masked_fill_(~owned.unsqueeze(-1), 0.0)


def embed_reduce(
    partial: torch.Tensor, comm: Communicator, dst: int | None = None, *, async_op: bool = False
) -> Pending:
    """Sum the partial embeddings in place: onto every rank (dst None) or onto rank dst only.

    With dst given, the other ranks' tensors are undefined afterwards (a reduce may use them as
    scratch); use the result only on dst.
    """
    work = (
        comm.all_reduce(partial, "sum", async_op=async_op)
        if dst is None
        else comm.reduce(partial, dst, async_op=async_op)
    )
    pending = Pending([work])
    if not async_op:
        pending.wait()
    return pending


def grad_broadcast(grad_emb: torch.Tensor, comm: Communicator, src: int, *, async_op: bool = False) -> Pending:
    """Send ∂L/∂embedding from rank src to every rank (in place; other ranks pass a same-shape buffer)."""
    pending = Pending([comm.broadcast(grad_emb, src, async_op=async_op)])
    if not async_op:
        pending.wait()
    return pending


@torch.no_grad()
def input_backward(ids: torch.Tensor, grad_emb: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """IB: this shard's embedding gradient, fp32 [shard.rows, h]; padding rows stay zero.

    Accumulated in fp32 whatever grad_emb's dtype, since a frequent token sums many rows. Every
    token is scattered, those of other shards as exact zeros, so no index list of the owned tokens
    is built (nonzero() would make the host wait for the device). The zeros go to rows spread by
    token position, not all to row 0, so a GPU's atomic adds do not pile up on one row.
    """
    local, owned = _owned_ids(ids, shard)
    hidden = grad_emb.shape[-1]
    flat_owned = owned.reshape(-1)
    values = grad_emb.reshape(-1, hidden).masked_fill(~flat_owned[:, None], 0.0).to(torch.float32)
    spread = torch.arange(flat_owned.numel(), device=ids.device) % shard.rows
    rows = torch.where(flat_owned, local.reshape(-1), spread)
    grad_w = torch.zeros(shard.rows, hidden, dtype=torch.float32, device=grad_emb.device)
    grad_w.index_add_(0, rows, values)
    return grad_w
