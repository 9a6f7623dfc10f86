"""The collective phases of the output layer, between S and T, and the synchronous interlaced step.

Barriers per microbatch (a barrier = collectives issued back to back with no compute pass between):

    naive       max  | exp pass |  (sum-exp, target)  | T |  ∇X        3 barriers, 3 collectives
    alg1        gather(max, sum-exp, target)          | T |  ∇X        2 barriers, 2 collectives
    alg2        gather(max, sum-exp, target) -> ∇X̂   (T later, no collective)   1 barrier, 2 collectives
    interlaced  as naive, every collective blocking, S..T back to back

alg1/alg2 gather the three [N] statistics of every rank in one all-gather instead of all-reducing
MAX then SUM: the merge (M = max m_r, S_tot = Σ s_r exp(m_r - M)) is then local, in the same rank
order on every rank, so all ranks get bitwise-identical statistics from a single collective. alg2's
∇X̂ all-reduce needs those statistics (its per-row rescale), so it is chained right after: only
O(N) and O(N h) elementwise work sits between the two, no pass over the logits.

Every phase takes `async_op`; the returned Pending completes the collective(s) and fills the state
on wait(). With async_op=False it is already complete. The ∇X sums (dx_phase, grad_input_phase) take
`dst`: a pipeline engine reduces them onto the loss rank only, the one rank that uses them, so the
others hold no result and free their part once the reduce completes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vptrain.vocab.comm import Communicator, Pending
from vptrain.vocab.grads import apply_token_grad, token_grad
from vptrain.vocab.output import (
    OutputState,
    output_s_pass,
    output_t_pass,
    per_token_loss,
    shard_logits,
    token_chunks,
)
from vptrain.vocab.shard import VocabShard

NAIVE = ("naive", "interlaced")  # the algorithms whose statistics take two barriers


def _finish(pending: Pending, async_op: bool) -> Pending:
    if not async_op:
        pending.wait()
    return pending


def stats_phase(state: OutputState, comm: Communicator, *, async_op: bool = False) -> Pending:
    """Make the global statistics (M, S_tot, Z[n, y_n]) available in `state` once waited.

    For naive/interlaced this is naive_max_phase (always waited: the exponentiation pass needs it)
    followed by naive_sum_phase (async_op applies to it); an engine that wants to run other passes
    between the two barriers calls them itself.
    """
    if state.stats_ready:
        raise RuntimeError("stats_phase already ran for this state")
    if state.algo in NAIVE:
        naive_max_phase(state, comm).wait()
        return naive_sum_phase(state, comm, async_op=async_op)
    packed = torch.stack([state.local_max, state.local_sum, state.target_logit])  # type: ignore[list-item]
    gathered = packed.new_empty(comm.world_size, *packed.shape)
    work = comm.all_gather(gathered, packed, async_op=async_op)

    def merge() -> None:
        maxes, sums, targets = gathered.unbind(1)  # each [p, N]
        gmax = maxes.amax(0)
        # A padding-only shard has max -inf and sum 0: exp(-inf) * 0 = 0, no NaN.
        state.global_sum = (sums * torch.exp(maxes - gmax)).sum(0)
        state.global_target = targets.sum(0)  # exactly one rank owns each valid label
        state.global_max = gmax

    return _finish(Pending([work], merge, buffers=[packed, gathered]), async_op)


def naive_max_phase(state: OutputState, comm: Communicator, *, async_op: bool = False) -> Pending:
    """naive/interlaced barrier 1: all-reduce MAX of the row maxima into state.global_max."""
    if state.algo not in NAIVE:
        raise RuntimeError(f"naive_max_phase is for {NAIVE}; {state.algo} uses stats_phase")
    if state.global_max is not None:
        raise RuntimeError("naive_max_phase already ran for this state")
    gmax = state.local_max.clone()
    work = comm.all_reduce(gmax, "max", async_op=async_op)

    def publish() -> None:
        state.global_max = gmax

    return _finish(Pending([work], publish, buffers=[gmax]), async_op)


def naive_sum_phase(state: OutputState, comm: Communicator, *, async_op: bool = False) -> Pending:
    """naive/interlaced barrier 2: exponentiate against M (a pass over the logits), then all-reduce
    (sum-exp, target logit). Needs naive_max_phase waited first."""
    if state.algo not in NAIVE:
        raise RuntimeError(f"naive_sum_phase is for {NAIVE}; {state.algo} uses stats_phase")
    if state.global_max is None:
        raise RuntimeError("naive_sum_phase needs the global max: run naive_max_phase and wait() on it first")
    if state.stats_ready:
        raise RuntimeError("naive_sum_phase already ran for this state")
    gmax = state.global_max
    sums = torch.zeros_like(gmax)
    if state.shard.real_rows > 0:
        for sl in token_chunks(state.num_tokens, state.chunk_tokens):
            z = None  # one chunk of logits alive at a time
            z = state.buffer[sl] if state.buffer is not None else shard_logits(state, sl)
            sums[sl] = z.sub_(gmax[sl, None]).exp_().sum(1)
    if state.buffer is not None:
        state.buffer_max = gmax
    packed = torch.stack([sums, state.target_logit])
    work = comm.all_reduce(packed, "sum", async_op=async_op)

    def unpack() -> None:
        state.global_sum, state.global_target = packed[0], packed[1]

    return _finish(Pending([work], unpack, buffers=[packed]), async_op)


def grad_input_phase(
    state: OutputState, comm: Communicator, *, async_op: bool = False, dst: int | None = None
) -> Pending:
    """alg2: sum ∇X̂ = Σ_r α_r A_r - W[y] (∂ℓ_n/∂X_n without g) over the ranks.

    dst None: all-reduce it into state.grad_x_hat on every rank. dst given: reduce it onto rank dst
    only, and leave the state without it: the sum is the returned Pending's `result` on dst once
    waited; on the other ranks `result` is only the send buffer, to drop after the wait (nothing
    else references it, so the state's A_r and G_r are gone from here on). Needs the statistics
    (wait on stats_phase first, or use c1_phase). Rows of ignored tokens are zero. Multiply by g
    with apply_token_grad.
    """
    if state.algo != "alg2":
        raise RuntimeError(f"grad_input_phase is alg2's; {state.algo} reduces ∇X after T (dx_phase)")
    state.require_stats("grad_input_phase")
    if state.a_local is None or state.target_rows is None:
        raise RuntimeError("grad_input_phase already ran for this state")
    # α_r / s_r: A_r was built from exp(Z - m_r), not from the normalised local softmax.
    scale = torch.exp(state.local_max - state.global_max) / state.global_sum  # type: ignore[operator]
    xhat = state.a_local.mul_(scale[:, None]).sub_(state.target_rows)
    xhat.masked_fill_(~state.valid[:, None], 0.0)
    state.a_local = state.target_rows = None
    if dst is not None:
        return _finish(Pending([comm.reduce(xhat, dst, async_op=async_op)], result=xhat), async_op)
    work = comm.all_reduce(xhat, "sum", async_op=async_op)

    def publish() -> None:
        state.grad_x_hat = xhat

    return _finish(Pending([work], publish, result=xhat), async_op)


def c1_phase(state: OutputState, comm: Communicator, *, async_op: bool = False) -> Pending:
    """The whole first barrier: stats_phase and, for alg2, grad_input_phase chained after it.

    With async_op the ∇X̂ all-reduce is issued when the returned Pending is waited (it needs the
    gathered statistics); an engine that wants it in flight earlier calls the two phases itself.
    """
    stats = stats_phase(state, comm, async_op=async_op)
    if state.algo != "alg2":
        return stats
    if not async_op:
        grad_input_phase(state, comm)
        return stats
    return Pending([stats], lambda: grad_input_phase(state, comm, async_op=True))


def dx_phase(grad_x: torch.Tensor, comm: Communicator, *, async_op: bool = False, dst: int | None = None) -> Pending:
    """naive/alg1/interlaced: sum the partial ∇X of every rank in place, onto every rank (dst None)
    or onto rank dst only (the others' grad_x is then undefined: drop it once waited)."""
    if dst is None:
        work = comm.all_reduce(grad_x, "sum", async_op=async_op)
    else:
        work = comm.reduce(grad_x, dst, async_op=async_op)
    return _finish(Pending([work], buffers=[grad_x], result=grad_x), async_op)


@dataclass(frozen=True)
class OutputStepResult:
    loss: torch.Tensor  # scalar fp32: Σ_n ℓ_n / loss_normalizer (not loss-scaled)
    grad_x: torch.Tensor  # [N, h] fp32, already summed over ranks (g applied)
    grad_w: torch.Tensor  # [shard.rows, h] fp32


def interlaced_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    comm: Communicator,
    *,
    loss_normalizer: float,
    loss_scale: float = 1.0,
    chunk_tokens: int = 0,
    store_softmax: bool = True,
) -> OutputStepResult:
    """The synchronous (tensor-parallel style) output layer: S, blocking phases, loss, g, T.

    The loss is mean-like, Σ ℓ_n / loss_normalizer, so g_n = loss_scale / loss_normalizer for every
    kept token: the closed form is what autograd of that loss yields, and every rank holds the same
    labels in this synchronous step, so all ranks use the same g.
    """
    return output_layer_step(
        x,
        weight,
        labels,
        shard,
        comm,
        "interlaced",
        loss_normalizer=loss_normalizer,
        loss_scale=loss_scale,
        chunk_tokens=chunk_tokens,
        store_softmax=store_softmax,
    )


def output_layer_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    comm: Communicator,
    algo: str,
    *,
    loss_normalizer: float,
    loss_scale: float = 1.0,
    chunk_tokens: int = 0,
    store_softmax: bool = True,
    async_op: bool = False,
) -> OutputStepResult:
    """One microbatch of any algorithm, passes in dependency order with nothing in between.

    This is the order an engine follows (with other passes interleaved where the waits are):
    S -> c1_phase -> loss and g -> T -> (alg2: ∇X̂ ⊙ g | others: dx_phase). Tests and benchmarks
    use it; g is the closed form of the masked mean (token_grad).
    """
    state = output_s_pass(x, weight, labels, shard, algo, chunk_tokens=chunk_tokens, store_softmax=store_softmax)
    c1_phase(state, comm, async_op=async_op).wait()
    loss = per_token_loss(state).sum() / loss_normalizer
    g = token_grad(labels, loss_normalizer, scale=loss_scale)
    grad_x, grad_w = output_t_pass(state, g)
    if grad_x is None:
        assert state.grad_x_hat is not None
        grad_x = apply_token_grad(state.grad_x_hat, g)
    else:
        dx_phase(grad_x, comm, async_op=async_op).wait()
    return OutputStepResult(loss=loss, grad_x=grad_x, grad_w=grad_w)
