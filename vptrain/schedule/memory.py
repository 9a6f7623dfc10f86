"""What the vocabulary layers hold on each rank, action by action (DESIGN.md invariant 7).

Every vocabulary buffer is allocated by one action of a rank and freed by another of the same rank,
so live bytes are a function of each rank's order, like the activation count in simulate.py:

    buffer (one microbatch)        from                    freed at
    X (X_BCAST buffer, S's input)  X_BCAST                 T (alg2: the later of T and DXHAT)
    S's masks, ids and statistics  S                       T (alg2: the later of T and DXHAT)
    fp32 shard softmax             S (store_softmax)       T
    alg2 A_r (becomes ∇X̂'s part)   S                       loss rank: B; others: DXHAT's release
    alg2 G_r = W[y]                S                       DXHAT
    statistics in flight           MAX / SUM / STATS       the first pass that waits for them
    global statistics              that wait               T (alg2: the later of T and DXHAT)
    g                              G_BCAST (loss rank: whichever of G_BCAST / DXHAT comes first)
                                                           T (loss rank under alg2: also B)
    partial ∇X (naive, alg1)       T                       loss rank: B; others: DX_REDUCE's release
    partial embedding              IF                      embedding rank: F; others: EMB_REDUCE's release
    embedding-output gradient      B (embedding rank) / DEMB_BCAST                     IB

A reduce whose result a rank does not use (∇X̂, ∇X off the loss rank, the embedding off the
embedding rank) has no consumer there: the engine completes it at its *release point*, the first
action of the rank at which every rank has provably issued it (a happens-before argument over this
schedule: program order, a receive after its send, a broadcast's wait after its source's issue, any
other collective's wait after every rank's issue). Waiting there never blocks on a peer and never
deadlocks, and on a GPU it stalls no stream; only collectives that nothing in the schedule follows
are completed at the optimizer step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vptrain.schedule.ir import Action, PassKind, Schedule, ScheduleError
from vptrain.schedule.rules import ScheduleRules

K = PassKind
BROADCASTS = (K.X_BCAST, K.G_BCAST, K.DEMB_BCAST)


@dataclass(frozen=True)
class VocabBufferSizes:
    """Bytes of each vocabulary buffer one rank holds for one microbatch (costs.vocab_buffer_sizes)."""

    x: int
    pass_state: int
    softmax: int
    a_local: int
    target_rows: int
    stats_in_flight: int
    global_max: int
    global_sum_target: int
    g: int
    grad_x: int
    embedding: int
    grad_embedding: int


def fire_and_forget(rules: ScheduleRules, rank: int) -> frozenset[PassKind]:
    """Collectives whose result `rank` does not use: it only contributes to a reduce."""
    kinds = set()
    if rank != rules.stages.loss_place[0]:
        kinds |= {K.DXHAT, K.DX_REDUCE} & set(rules.method.collectives)
    if rank != rules.stages.embed_place[0]:
        kinds |= {K.EMB_REDUCE} & set(rules.method.collectives)
    return frozenset(kinds)


def release_points(s: Schedule, rules: ScheduleRules | None = None) -> tuple[dict[int, tuple[Action, ...]], ...]:
    """Per rank: position -> the fire-and-forget collectives to complete right after that action.

    Knowledge is tracked as, per rank, how many collectives of every rank it knows were issued
    (collectives are issued in one order on all ranks, so a count says which). A collective is
    released once every rank's count is past it; what is never known is released after the
    rank's last action.
    """
    rules = rules or ScheduleRules.of(method=s.method, name=s.name, p=s.p, chunks=s.chunks)
    p = s.p
    order = [a for a in s.ranks[0] if a.kind.is_collective]
    index = {a: k for k, a in enumerate(order)}
    loss_rank, embed_rank = rules.stages.loss_place[0], rules.stages.embed_place[0]
    source = {K.X_BCAST: loss_rank, K.G_BCAST: loss_rank, K.DEMB_BCAST: embed_rank}
    # Knowledge vectors are small integer arrays joined in place (numpy: the joins are most of
    # the work at p = 32); every vector stored for later joins is a copy.
    known = [np.zeros(p, dtype=np.int64) for _ in range(p)]
    issued = [0] * len(order)  # [k]: how many ranks issued collective k
    joined: list[np.ndarray | None] = [None] * len(order)  # [k]: the issuers' knowledge so far, joined
    broadcast_at: list[np.ndarray | None] = [None] * len(order)  # [k]: the source's, for a broadcast
    complete_at: list[np.ndarray | None] = [None] * len(order)  # [k]: joined over all ranks, once all issued
    at_send: dict[tuple[int, Action], np.ndarray] = {}
    pending: list[deque[tuple[int, Action]]] = [deque() for _ in range(p)]
    forget = [fire_and_forget(rules, r) for r in range(p)]
    out: list[dict[int, list[Action]]] = [{} for _ in range(p)]
    pos = [0] * p
    waiters: dict[object, list[int]] = {}
    work = deque(range(p))
    maximum = np.maximum

    recv = (K.RECV_F, K.RECV_B)
    send = (K.SEND_F, K.SEND_B)
    needs_of = rules.needs
    while work:
        r = work.popleft()
        row, mine = s.ranks[r], known[r]
        while pos[r] < len(row):
            n = pos[r]
            a = row[n]
            kind = a.kind
            needs = needs_of(r, a)
            if not needs.waits and kind.is_compute:  # a pass that waits for nothing: nothing learnt
                pos[r] += 1
                continue
            vectors = []
            missing: object = None
            if kind in recv:
                vector = at_send.get(needs.peer)  # type: ignore[arg-type]
                missing = needs.peer if vector is None else None
                vectors.append(vector)
            for w in needs.waits:
                k = index[w]
                vector = broadcast_at[k] if w.kind in BROADCASTS else complete_at[k]
                missing = k if vector is None else missing
                vectors.append(vector)
            if missing is not None:
                waiters.setdefault(missing, []).append(r)  # woken by that send or that issue
                break
            for vector in vectors:
                maximum(mine, vector, out=mine)
            if kind.is_collective:
                k = index[a]
                mine[r] = k + 1
                snapshot = mine.copy()
                if kind in BROADCASTS and r == source[kind]:
                    broadcast_at[k] = snapshot
                if joined[k] is None:
                    joined[k] = snapshot.copy()
                else:
                    maximum(joined[k], snapshot, out=joined[k])
                issued[k] += 1
                if issued[k] == p:
                    complete_at[k] = joined[k]
                if kind in forget[r]:
                    pending[r].append((k, a))
                work.extend(waiters.pop(k, ()))
            elif kind in send:
                at_send[(r, a)] = mine.copy()
                work.extend(waiters.pop((r, a), ()))
            if vectors and pending[r]:
                everyone = int(mine.min())
                while pending[r] and pending[r][0][0] < everyone:
                    out[r].setdefault(n, []).append(pending[r].popleft()[1])
            pos[r] += 1
    stuck = [r for r in range(p) if pos[r] < len(s.ranks[r])]
    if stuck:
        raise ScheduleError(f"release points: ranks {stuck} cannot finish (validate the schedule first)")
    for r in range(p):
        if pending[r]:
            out[r].setdefault(len(s.ranks[r]) - 1, []).extend(a for _, a in pending[r])
    return tuple({n: tuple(acts) for n, acts in rank.items()} for rank in out)


def vocab_live_bytes(
    s: Schedule,
    sizes: Sequence[VocabBufferSizes],
    rules: ScheduleRules | None = None,
    releases: tuple[dict[int, tuple[Action, ...]], ...] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Per rank, the vocabulary bytes alive after each of its actions (after that action's releases)."""
    rules = rules or ScheduleRules.of(method=s.method, name=s.name, p=s.p, chunks=s.chunks)
    if not rules.method.vocab:
        return tuple(tuple(0 for _ in row) for row in s.ranks)
    releases = releases or release_points(s, rules)
    return tuple(_rank_live_bytes(s, rules, r, sizes[r], releases[r]) for r in range(s.p))


def _rank_live_bytes(
    s: Schedule, rules: ScheduleRules, r: int, z: VocabBufferSizes, releases: dict[int, tuple[Action, ...]]
) -> tuple[int, ...]:
    row = s.ranks[r]
    at = {a: n for n, a in enumerate(row)}
    freed = {a: n for n, acts in releases.items() for a in acts}
    collectives = rules.method.collectives
    naive, alg2 = K.MAX in collectives, K.DXHAT in collectives
    loss_rank, loss_chunk = rules.stages.loss_place
    embed_rank, embed_chunk = rules.stages.embed_place
    on_loss, on_embed = r == loss_rank, r == embed_rank
    delta = [0] * (len(row) + 1)

    def hold(size: int, start: int, end: int) -> None:
        # Alive after actions start .. end-1: allocated by action `start`, gone after action `end`.
        delta[start] += size
        delta[end] -= size

    def pos(kind: PassKind, mb: int, chunk: int = 0) -> int:
        return at[Action(kind, mb, chunk)]

    for i in range(s.num_microbatches):
        s_at, t_at = pos(K.S, i), pos(K.T, i)
        # T frees the softmax; the rest of S's state also serves alg2's DXHAT, which may come later.
        state_end = max(t_at, pos(K.DXHAT, i)) if alg2 else t_at
        hold(z.x, pos(K.X_BCAST, i), state_end)
        hold(z.pass_state, s_at, state_end)
        hold(z.softmax, s_at, t_at)
        # The loss rank consumes the reduced ∇X (∇X̂) at its B; elsewhere it is released unused.
        dx_end = pos(K.B, i, loss_chunk) if on_loss else freed[Action(K.DXHAT if alg2 else K.DX_REDUCE, i)]
        if alg2:
            hold(z.target_rows, s_at, pos(K.DXHAT, i))
            hold(z.a_local, s_at, dx_end)
        else:
            hold(z.grad_x, t_at, dx_end)
        if naive:
            hold(z.global_max, pos(K.MAX, i), t_at)
            hold(z.global_sum_target, pos(K.SUM, i), t_at)
        else:  # gathered until the first pass that waits for them, merged into the state until T
            waits = [t_at] + ([pos(K.G_BCAST, i)] if on_loss else []) + ([pos(K.DXHAT, i)] if alg2 else [])
            hold(z.stats_in_flight, pos(K.STATS, i), min(waits))
            hold(z.global_max + z.global_sum_target, min(waits), state_end)
        if on_loss and alg2:  # computed by the first of G_BCAST / DXHAT, used by T and by B
            hold(z.g, min(pos(K.G_BCAST, i), pos(K.DXHAT, i)), max(t_at, dx_end))
        else:
            hold(z.g, pos(K.G_BCAST, i), t_at)
        emb_end = pos(K.F, i, embed_chunk) if on_embed else freed[Action(K.EMB_REDUCE, i)]
        hold(z.embedding, pos(K.IF, i), emb_end)
        hold(z.grad_embedding, pos(K.B, i, embed_chunk) if on_embed else pos(K.DEMB_BCAST, i), pos(K.IB, i))
    live, total = [], 0
    for n in range(len(row)):
        total += delta[n]
        live.append(total)
    return tuple(live)
