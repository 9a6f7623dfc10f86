"""The dependency rules, written down once: where stages live, which passes and collectives a method
has, and what every action needs before it may run.

The validator, the simulator and the builders all read `ScheduleRules.needs`, so they cannot
disagree about semantics. The per-microbatch chain for the vocabulary methods (vp_algorithms §2, §3):

    IF -> EMB_REDUCE -> F(stage 0) ... F(last) -> X_BCAST -> S -> {MAX -> SUM | STATS}
       -> G_BCAST -> T -> DX_REDUCE -> B(last)                      (vocab-naive, interlaced, vocab-1)
       -> DXHAT -> B(last);  G_BCAST -> T (off the critical path)   (vocab-2)
    B(stage 0) -> DEMB_BCAST -> IB
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vptrain.schedule.ir import Action, PassKind
from vptrain.schedule.kinds import schedule_kind

METHOD_NAMES = ("baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2")

K = PassKind


@dataclass(frozen=True)
class StageMap:
    """Where each pipeline stage lives (the placement of kinds.SCHEDULE_KINDS[name]).

    line: stage s on rank s (one chunk per rank: 1f1b, zb-h1).
    v:    rank r holds stage r as chunk 0 and stage 2p-1-r as chunk 1, so the model goes down the
          ranks and back up in a V: the first stage (input embedding) and the last stage (loss)
          are both on rank 0, and the hand-off between chunk 0 and chunk 1 on rank p-1 is local.
    loop: rank r holds stages r, r+p, ..., r+(v-1)p as chunks 0..v-1 (interleaved): the model loops
          over the ranks v times, every hand-off crosses ranks, the loss is on rank p-1's last chunk.
    `chunks` is only given for a schedule whose chunk count is a setting (interleaved).
    """

    p: int
    name: str
    chunks: int = field(default=0)
    placement: str = field(init=False)
    num_stages: int = field(init=False)

    def __post_init__(self) -> None:
        kind = schedule_kind(self.name)
        object.__setattr__(self, "placement", kind.placement)
        object.__setattr__(self, "chunks", self.chunks or kind.chunks())
        object.__setattr__(self, "num_stages", self.p * self.chunks)

    def stage(self, rank: int, chunk: int) -> int:
        if self.placement == "v":
            return rank if chunk == 0 else 2 * self.p - 1 - rank
        return chunk * self.p + rank

    def place(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) of a stage."""
        if self.placement == "v":
            return (stage, 0) if stage < self.p else (2 * self.p - 1 - stage, 1)
        return stage % self.p, stage // self.p

    @property
    def loss_place(self) -> tuple[int, int]:
        return self.place(self.num_stages - 1)

    @property
    def embed_place(self) -> tuple[int, int]:
        return self.place(0)

    def next_place(self, rank: int, chunk: int) -> tuple[int, int] | None:
        s = self.stage(rank, chunk)
        return self.place(s + 1) if s + 1 < self.num_stages else None

    def prev_place(self, rank: int, chunk: int) -> tuple[int, int] | None:
        s = self.stage(rank, chunk)
        return self.place(s - 1) if s > 0 else None


@dataclass(frozen=True)
class MethodRules:
    """What a method adds to the plain F/B pipeline.

    `collectives` lists one microbatch's vocabulary collectives in dependency order. `loss_grad` is
    the collective the loss stage's B waits for (None: the loss is local, baseline/redis).
    `stats` is the collective whose result the loss rank needs before broadcasting g. `blocking`
    makes every collective issue wait for its completion (interlaced: the whole pipeline stops for a
    microbatch's vocabulary layers). `extra_in_flight` is how many more microbatches than plain 1F1B
    the first stage keeps in flight so that the loss stage's B does not wait for the barriers.
    """

    name: str
    vocab: bool
    collectives: tuple[PassKind, ...]
    loss_grad: PassKind | None
    stats: PassKind | None
    blocking: bool
    extra_in_flight: int


def method_rules(method: str) -> MethodRules:
    embed = (K.EMB_REDUCE, K.DEMB_BCAST)
    if method in ("baseline", "redis"):
        return MethodRules(method, False, (), None, None, False, 0)
    if method in ("vocab-naive", "interlaced"):
        chain = (K.X_BCAST, K.MAX, K.SUM, K.G_BCAST, K.DX_REDUCE) + embed
        # interlaced's extra is not a constant: the builder gives it a 1.5p warm-up (vp_algorithms §5).
        return MethodRules(method, True, chain, K.DX_REDUCE, K.SUM, method == "interlaced", 2)
    if method == "vocab-1":
        chain = (K.X_BCAST, K.STATS, K.G_BCAST, K.DX_REDUCE) + embed
        return MethodRules(method, True, chain, K.DX_REDUCE, K.STATS, False, 2)
    if method == "vocab-2":
        chain = (K.X_BCAST, K.STATS, K.DXHAT, K.G_BCAST) + embed
        return MethodRules(method, True, chain, K.DXHAT, K.STATS, False, 1)
    raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)}")


@dataclass(frozen=True)
class Needs:
    """What one action on one rank needs.

    after: actions on the same rank that must appear earlier in its list.
    waits: collectives that must have completed before the action starts (the rank must also have
           issued them earlier in its own list).
    peer:  for p2p, (rank, action) of the matching send or receive.
    """

    after: tuple[Action, ...] = ()
    waits: tuple[Action, ...] = ()
    peer: tuple[int, Action] | None = None


_NONE = Needs()

# p2p kind -> (the peer's kind, the local pass a send must follow, whether the peer is the next stage)
_P2P_SHAPE: dict[PassKind, tuple[PassKind, PassKind | None, bool]] = {
    K.SEND_F: (K.RECV_F, K.F, True),
    K.RECV_F: (K.SEND_F, None, False),
    K.SEND_B: (K.RECV_B, K.B, False),
    K.RECV_B: (K.SEND_B, None, True),
}


@dataclass(frozen=True)
class ScheduleRules:
    stages: StageMap
    method: MethodRules
    _memo: dict[tuple[int, Action], Needs] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, *, method: str, name: str, p: int, chunks: int = 0) -> ScheduleRules:
        """`chunks` only for a schedule whose chunk count is a setting (interleaved; 0: its default)."""
        return cls(StageMap(p, name, chunks), method_rules(method))

    @property
    def split_backward(self) -> bool:
        """Every (microbatch, chunk) has a W after its B (kinds.ScheduleKind.split_backward)."""
        return schedule_kind(self.stages.name).split_backward

    def needs(self, rank: int, a: Action) -> Needs:
        key = (rank, a)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._needs(rank, a)
        return found

    def _needs(self, rank: int, a: Action) -> Needs:
        i, c = a.microbatch, a.chunk
        st, mr = self.stages, self.method
        kind = a.kind
        if kind is K.F:
            prev = st.prev_place(rank, c)
            if prev is None:
                return Needs(waits=(Action(K.EMB_REDUCE, i),)) if mr.vocab else _NONE
            if prev[0] == rank:
                return Needs(after=(Action(K.F, i, prev[1]),))
            return Needs(after=(Action(K.RECV_F, i, c),))
        if kind is K.B:
            nxt = st.next_place(rank, c)
            if nxt is None:
                waits = (Action(mr.loss_grad, i),) if mr.loss_grad else ()
                return Needs(after=(Action(K.F, i, c),), waits=waits)
            grad = Action(K.B, i, nxt[1]) if nxt[0] == rank else Action(K.RECV_B, i, c)
            return Needs(after=(Action(K.F, i, c), grad))
        if kind is K.W:
            return Needs(after=(Action(K.B, i, c),))
        if kind is K.S:
            return Needs(waits=(Action(K.X_BCAST, i),))
        if kind is K.T:
            return Needs(after=(Action(K.S, i),), waits=(Action(K.G_BCAST, i),))
        if kind is K.IB:
            return Needs(waits=(Action(K.DEMB_BCAST, i),))
        if kind is K.IF:
            return _NONE
        if kind.is_p2p:
            return self._p2p_needs(rank, a)
        return self._collective_needs(rank, a)

    def _p2p_needs(self, rank: int, a: Action) -> Needs:
        i, c = a.microbatch, a.chunk
        peer_kind, producer, toward_next = _P2P_SHAPE[a.kind]
        # Activations flow to the next stage, gradients to the previous one.
        place = self.stages.next_place(rank, c) if toward_next else self.stages.prev_place(rank, c)
        if place is None or place[0] == rank:
            raise ValueError(f"{a} on rank {rank}: no neighbouring stage on another rank in that direction")
        after = (Action(producer, i, c),) if producer is not None else ()
        return Needs(after=after, peer=(place[0], Action(peer_kind, i, place[1])))

    def _collective_needs(self, rank: int, a: Action) -> Needs:
        i = a.microbatch
        kind = a.kind
        loss_rank, loss_chunk = self.stages.loss_place
        embed_rank, embed_chunk = self.stages.embed_place
        if kind is K.X_BCAST:
            return Needs(after=(Action(K.F, i, loss_chunk),)) if rank == loss_rank else _NONE
        if kind in (K.MAX, K.STATS):
            return Needs(after=(Action(K.S, i),))
        if kind is K.SUM:
            return Needs(waits=(Action(K.MAX, i),))
        if kind is K.G_BCAST:
            if rank == loss_rank and self.method.stats is not None:
                return Needs(waits=(Action(self.method.stats, i),))
            return _NONE
        if kind is K.DXHAT:
            return Needs(waits=(Action(K.STATS, i),))
        if kind is K.DX_REDUCE:
            return Needs(after=(Action(K.T, i),))
        if kind is K.EMB_REDUCE:
            return Needs(after=(Action(K.IF, i),))
        if kind is K.DEMB_BCAST:
            return Needs(after=(Action(K.B, i, embed_chunk),)) if rank == embed_rank else _NONE
        raise AssertionError(f"unhandled kind {kind}")

    def expected(self, rank: int, m: int) -> list[Action]:
        """Every action rank `rank` must execute exactly once (W only, and always, where the schedule
        splits the backward)."""
        out: list[Action] = []
        st = self.stages
        split = self.split_backward
        for c in range(st.chunks):
            nxt, prev = st.next_place(rank, c), st.prev_place(rank, c)
            for i in range(m):
                out += [Action(K.F, i, c), Action(K.B, i, c)] + ([Action(K.W, i, c)] if split else [])
                if nxt is not None and nxt[0] != rank:
                    out += [Action(K.SEND_F, i, c), Action(K.RECV_B, i, c)]
                if prev is not None and prev[0] != rank:
                    out += [Action(K.RECV_F, i, c), Action(K.SEND_B, i, c)]
        if self.method.vocab:
            for i in range(m):
                out += [Action(k, i) for k in (K.S, K.T, K.IF, K.IB)]
                out += [Action(k, i) for k in self.method.collectives]
        return out
