"""Bytes of the vocabulary layers' buffers per microbatch, from the model's shape: the sizes that
memory.vocab_live_bytes times over a schedule, and the closed form used where no schedule timing is
at hand. Split out of costs.py (which re-exports both)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vptrain.schedule.memory import VocabBufferSizes

if TYPE_CHECKING:
    from vptrain.schedule.costs import ModelShape

ALGORITHM_2 = ("vocab-2",)


def vocab_buffer_sizes(
    m: ModelShape, *, method: str, p: int, store_softmax: bool = True
) -> tuple[VocabBufferSizes, ...]:
    """Bytes of every vocabulary buffer of one microbatch, per rank: what the engine allocates
    (vptrain/vocab, vptrain/engine/vocab_passes.py), for memory.vocab_live_bytes to time.

    N tokens, h hidden, a activation bytes (the tables are in the same dtype), R the rank's real
    rows: X, the embedding and its gradient N*h*a; ∇X, A_r, G_r N*h fp32; the softmax N*R fp32;
    g and each statistic N fp32; S's masks and ids N*(1 + 1 + 8) plus its N fp32 statistics (two,
    three with a local sum); alg1/alg2 gather 3 statistics from p ranks (plus their own 3 in flight).
    """
    n, h, a = m.tokens, m.hidden, m.act_bytes
    naive = method in ("vocab-naive", "interlaced")
    alg2 = method in ALGORITHM_2
    per_rank = m.vocab_rows // p
    sizes = []
    for rank in range(p):
        real = max(0, min(m.vocab, (rank + 1) * per_rank) - rank * per_rank)
        sizes.append(VocabBufferSizes(
            x=n * h * a,
            pass_state=n * (1 + 1 + 8 + 4 + 4 + (0 if naive else 4)),
            softmax=n * real * 4 if store_softmax else 0,
            a_local=n * h * 4 if alg2 else 0,
            target_rows=n * h * 4 if alg2 else 0,
            stats_in_flight=0 if naive else (3 + 3 * p) * n * 4,
            global_max=n * 4,
            global_sum_target=2 * n * 4,
            g=n * 4,
            grad_x=0 if alg2 else n * h * 4,
            embedding=n * h * a,
            grad_embedding=n * h * a,
        ))
    return tuple(sizes)


def vocab_buffer_bytes(m: ModelShape, *, method: str, p: int, in_flight_vocab: int, loss_in_flight: int) -> float:
    """Output-layer buffers beyond the transformer activations (see the module docstring)."""
    if method in ("baseline", "redis"):
        return float(loss_in_flight) * m.tokens * m.vocab_rows * 4.0
    per = m.tokens * (m.vocab_rows // p) * 4.0 + m.tokens * (m.hidden + 1) * 4.0
    if method in ALGORITHM_2:
        per += 2.0 * m.tokens * m.hidden * 4.0
    return in_flight_vocab * per
