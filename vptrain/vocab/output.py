"""The vocabulary-parallel output layer: h -> V projection + softmax cross-entropy, sharded by rows.

Rank r owns rows [start, end) of W (V x h). One microbatch goes through

    S (local, this file)  ->  collective phases (output_phases.py)  ->  T (local, this file)

and every piece of per-microbatch data lives in an `OutputState` that the caller owns, so a
pipeline engine can hold many microbatches in flight and run S of one and T of another in any
order. reference.py writes the math out shard by shard; in short, with Z = X W_rᵀ (fp32):

* naive / interlaced: S keeps Z and its row max; the stats phase all-reduces the max, exponentiates
  against it and all-reduces (sum-exp, target logit); T builds the gradient; ∇X is all-reduced.
* alg1: S also exponentiates against the *local* max and sums, so one statistics collective
  suffices; T rescales by exp(m_r - M) / S_tot to the global softmax.
* alg2: S also forms A_r = exp(Z - m_r) W_r and the target rows G_r, so the single barrier yields
  the global statistics and ∇X̂ = Σ_r α_r A_r - W[y] together; T computes only ∇W.

Numerics: GEMMs run in the weight's dtype and accumulate into fp32 (gemm.py); logits, statistics,
softmax and every returned gradient are fp32, never rounded to bf16 on the way. Padding rows (past
`shard.vocab_size`) never enter a GEMM, so they cannot reach the softmax, a target or a gradient:
their ∇W rows are exactly zero. Nothing here reads a tensor's value on the host (DESIGN.md
invariant 6): masks select by arithmetic, never by a list of indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vptrain.vocab import gemm
from vptrain.vocab.shard import IGNORE_INDEX, VocabShard

ALGOS = ("naive", "alg1", "alg2", "interlaced")
STATS = torch.float32


@dataclass(eq=False)
class OutputState:
    """One microbatch of the output layer on one rank, from S to T. Owned by the caller.

    Filled by S: the inputs and local statistics. Filled by the stats phase: global_max (M),
    global_sum (S_tot = Σ_j exp(Z_j - M)), global_target (Z[n, y_n]). Filled by alg2's grad-input
    phase: grad_x_hat (∂ℓ_n/∂X_n without g). T frees the fp32 buffer.
    """

    algo: str
    shard: VocabShard
    x: torch.Tensor  # [N, h] in the weight's dtype, detached
    weight: torch.Tensor  # [rows, h] this rank's shard, detached
    valid: torch.Tensor  # [N] bool: label != IGNORE_INDEX
    owned: torch.Tensor  # [N] bool: the label is one of this shard's real rows
    target: torch.Tensor  # [N] int64: the label's row in this shard (0 where not owned)
    chunk_tokens: int
    local_max: torch.Tensor  # [N] fp32, -inf for a shard of padding only
    target_logit: torch.Tensor  # [N] fp32: Z[n, y_n] where owned, else 0
    local_sum: torch.Tensor | None = None  # [N] fp32 Σ exp(Z - local_max) (alg1/alg2)
    buffer: torch.Tensor | None = None  # [N, real_rows] fp32 kept for T (store_softmax)
    buffer_max: torch.Tensor | None = None  # [N] the max the buffer's exps are taken against
    a_local: torch.Tensor | None = None  # [N, h] fp32 exp(Z - local_max) W_r (alg2)
    target_rows: torch.Tensor | None = None  # [N, h] fp32 W[y_n] where owned, else 0 (alg2)
    global_max: torch.Tensor | None = None
    global_sum: torch.Tensor | None = None
    global_target: torch.Tensor | None = None
    grad_x_hat: torch.Tensor | None = None  # [N, h] fp32 (alg2, after grad_input_phase)
    t_done: bool = False

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def stats_ready(self) -> bool:
        return self.global_sum is not None

    def require_stats(self, what: str) -> None:
        if not self.stats_ready:
            raise RuntimeError(f"{what} needs the global statistics: run stats_phase and wait() on it first")


def token_chunks(num_tokens: int, chunk_tokens: int) -> Iterator[slice]:
    """Token slices of at most chunk_tokens (0: one slice); bounds the fp32 logits buffer."""
    step = chunk_tokens if chunk_tokens > 0 else max(num_tokens, 1)
    for lo in range(0, num_tokens, step):
        yield slice(lo, min(lo + step, num_tokens))


def shard_logits(state: OutputState, sl: slice, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits Z[sl] of the shard's real rows (written into out when given), fp32-accumulated."""
    return gemm.mm(state.x[sl], state.weight[: state.shard.real_rows].t(), out)


@torch.no_grad()
def output_s_pass(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    algo: str,
    *,
    chunk_tokens: int = 0,
    store_softmax: bool = True,
) -> OutputState:
    """S: this shard's local logits and statistics for one microbatch (no communication).

    x [N, h] any float dtype (cast to the weight's); weight [shard.rows, h]; labels [N] int64 with
    IGNORE_INDEX for masked tokens. store_softmax=False keeps no [N, V/p] buffer: the logits are
    recomputed where needed (the naive stats phase, T). chunk_tokens > 0 processes the tokens in
    chunks so the transient fp32 logits are at most chunk_tokens x V/p.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown output algorithm {algo!r}; expected one of {ALGOS}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or weight.shape[0] != shard.rows:
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)} do not fit shard rows={shard.rows}")
    labels = labels.reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {x.shape[0]} tokens")
    valid = labels != IGNORE_INDEX
    # A label outside the real vocabulary would be owned by no shard and silently lose its target
    # term; fail like F.cross_entropy does. _assert_async does not synchronise a GPU stream.
    torch._assert_async(((labels >= 0) & (labels < shard.vocab_size) | ~valid).all())
    target, owned = shard.localize(labels)
    n, rows = x.shape[0], shard.real_rows
    dev = x.device
    state = OutputState(
        algo=algo,
        shard=shard,
        x=x.detach().to(weight.dtype),
        weight=weight.detach(),
        valid=valid,
        owned=owned,
        target=target,
        chunk_tokens=chunk_tokens,
        local_max=torch.full((n,), float("-inf"), dtype=STATS, device=dev),
        target_logit=torch.zeros(n, dtype=STATS, device=dev),
    )
    synchronous = algo in ("naive", "interlaced")  # exp must wait for the global max
    if store_softmax:
        state.buffer = torch.empty(n, rows, dtype=STATS, device=dev)
    if not synchronous:
        state.local_sum = torch.zeros(n, dtype=STATS, device=dev)
        state.buffer_max = state.local_max
    if algo == "alg2":
        state.a_local = torch.zeros(n, x.shape[1], dtype=STATS, device=dev)
        state.target_rows = torch.where(owned[:, None], state.weight[target].to(STATS), 0.0)
    if rows == 0:  # a shard of padding only: no logits, statistics stay (-inf max, 0 sum)
        return state
    w = state.weight[:rows]
    for sl in token_chunks(n, chunk_tokens):
        z = None  # drop the previous chunk before the next is allocated: one chunk of logits at a time
        z = shard_logits(state, sl, None if state.buffer is None else state.buffer[sl])
        state.local_max[sl] = z.amax(1)
        picked = z.gather(1, target[sl, None]).squeeze(1)
        state.target_logit[sl] = torch.where(owned[sl], picked, 0.0)
        if synchronous:
            continue
        z.sub_(state.local_max[sl, None]).exp_()
        state.local_sum[sl] = z.sum(1)  # type: ignore[index]
        if algo == "alg2":
            gemm.mm(z, w, out=state.a_local[sl])  # type: ignore[index]
    return state


def per_token_loss(state: OutputState) -> torch.Tensor:
    """ℓ_n = log S_tot - (Z[n, y_n] - M) in fp32, 0 for ignored tokens; needs the stats phase."""
    state.require_stats("per_token_loss")
    loss = torch.log(state.global_sum) + state.global_max - state.global_target  # type: ignore[operator]
    return torch.where(state.valid, loss, 0.0)


@torch.no_grad()
def output_t_pass(state: OutputState, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """T: (partial ∇X, ∇W_shard) for the per-token upstream gradient g [N] (fp32).

    D = g ⊙ (softmax_shard - onehot_shard); ∇X_r = D W_r (naive/alg1/interlaced: reduce it with
    dx_phase), ∇W_r = Dᵀ X. alg2 returns None for ∇X (its ∇X̂ came from the grad-input phase).
    ∇W is fp32 [shard.rows, h] with zero padding rows; add it with accumulate_grad. Ignored tokens
    contribute nothing whatever g holds for them. Frees the state's fp32 buffer.
    """
    state.require_stats("output_t_pass")
    if state.t_done:
        raise RuntimeError("output_t_pass already ran for this state")
    n, rows, hidden = state.num_tokens, state.shard.real_rows, state.x.shape[1]
    g = torch.where(state.valid, g.reshape(-1).to(STATS), 0.0)
    if g.shape[0] != n:
        raise ValueError(f"g has {g.shape[0]} entries for {n} tokens")
    dev = state.x.device
    grad_w = torch.zeros(state.shard.rows, hidden, dtype=STATS, device=dev)
    grad_x = None if state.algo == "alg2" else torch.zeros(n, hidden, dtype=STATS, device=dev)
    if rows > 0:
        gmax, gsum = state.global_max, state.global_sum
        stored = state.buffer is not None
        # The buffer holds exp(Z - buffer_max); this per-row factor turns it into g * softmax.
        shift = state.buffer_max if stored else gmax
        coef = g * torch.exp(shift - gmax) / gsum  # type: ignore[operator]
        w, gw = state.weight[:rows], grad_w[:rows]
        for sl in token_chunks(n, state.chunk_tokens):
            d = d_op = None  # one chunk of logits alive at a time
            if stored:
                d = state.buffer[sl]  # type: ignore[index]
            else:
                d = shard_logits(state, sl)
                d.sub_(gmax[sl, None]).exp_()  # type: ignore[index]
            d.mul_(coef[sl, None])
            # The one-hot term: -g_n at (n, y_n) where this shard owns y_n. Every token adds into its
            # own row (target is row 0 where not owned, and adds exactly 0 there), so no index list
            # of the owned tokens is needed: nonzero() would make the host wait for the device.
            d.scatter_add_(1, state.target[sl, None], torch.where(state.owned[sl], -g[sl], 0.0)[:, None])
            d_op = gemm.operand(d, w.dtype)
            if grad_x is not None:
                gemm.mm(d_op, w, out=grad_x[sl])
            gemm.addmm_(gw, d_op.t(), state.x[sl])
    state.buffer = None
    state.t_done = True
    return grad_x, grad_w
