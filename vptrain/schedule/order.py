"""The operations two ranks share, and the order they must share them in (DESIGN.md invariant 5).

Two ranks share a p2p transfer between them (a send on one side, its receive on the other) and
every vocabulary collective (the vocabulary group holds all pipeline ranks). NCCL needs both ranks
to issue their shared operations in one relative order whatever the communicator: kernels of two
communicators need not run concurrently (e.g. CUDA_DEVICE_MAX_CONNECTIONS=1), and a rank blocked
in an operation its peer has not reached blocks the peer in turn. Gloo forgives a violation; this
module is what the validator and the strict runtime checker (vptrain.engine.strict_order) use to
refuse it.

`shared_op(rules, rank, action)` names an operation the same way on both sides: a transfer by its
sender and the sender's action, a collective by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from vptrain.schedule.ir import Action, PassKind, Schedule
from vptrain.schedule.rules import ScheduleRules

K = PassKind
ALL = -1
"""`SharedOp.peer` of a collective: every other rank of the vocabulary group."""


@dataclass(frozen=True)
class SharedOp:
    """An operation as every participant names it. `peer` is the one other rank of a transfer
    (ALL for a collective); `key` is equal on both sides: (sender, the sender's action) for a
    transfer, (ALL, the action) for a collective."""

    peer: int
    key: tuple[int, Action]

    def describe(self) -> str:
        sender, a = self.key
        if sender == ALL:
            return str(a)
        kind = "activation" if a.kind is K.SEND_F else "gradient"
        return f"{kind} {a.microbatch}{'.' + str(a.chunk) if a.chunk else ''} sent by rank {sender}"


def shared_op(rules: ScheduleRules, rank: int, a: Action) -> SharedOp | None:
    """How `a` on `rank` is shared with other ranks (None: a compute pass, shared with nobody)."""
    if a.kind.is_collective:
        return SharedOp(ALL, (ALL, a))
    if not a.kind.is_p2p:
        return None
    peer_rank, peer_action = rules.needs(rank, a).peer  # type: ignore[misc]
    sender = (rank, a) if a.kind in (K.SEND_F, K.SEND_B) else (peer_rank, peer_action)
    return SharedOp(peer_rank, sender)


@dataclass(frozen=True)
class OrderConflict:
    """Ranks `a` and `b` share `first` and `second`; `a` runs `first` earlier, `b` runs `second`
    earlier. Positions index each rank's full action list."""

    a: int
    b: int
    first: SharedOp
    second: SharedOp
    positions_a: tuple[int, int]
    """Where rank a runs (first, second)."""
    positions_b: tuple[int, int]
    """Where rank b runs (first, second)."""

    def message(self, s: Schedule) -> str:
        (fa, sa), (fb, sb) = self.positions_a, self.positions_b
        row_a, row_b = s.ranks[self.a], s.ranks[self.b]
        return (
            f"ranks {self.a} and {self.b} share {self.first.describe()} and {self.second.describe()} in opposite "
            f"orders: rank {self.a} runs {row_a[fa]} (position {fa}) before {row_a[sa]} (position {sa}), rank "
            f"{self.b} runs {row_b[sb]} (position {sb}) before {row_b[fb]} (position {fb}); two ranks must issue "
            "the operations they share in the same order (NCCL hangs otherwise)"
        )


def first_order_conflict(s: Schedule, rules: ScheduleRules) -> OrderConflict | None:
    """The first pair of ranks whose shared operations differ in relative order, or None.

    Expects every rank to run each of its expected actions exactly once (validator rule 1), so two
    ranks' shared sequences hold the same operations and the first index where they differ names
    two operations in opposite orders. Collectives are shared by all ranks, so the pairs without a
    transfer between them only need one comparison of every rank's collectives with rank 0's; the
    linked pairs (neighbouring stages) compare their whole shared sequences. O(actions); the lists
    are compared whole first (the common case: they agree), element by element only to report.
    """
    # Per rank: (peer or ALL, key, position) of every shared operation. Keys: the action itself for
    # a collective, (sender, the sender's action) for a transfer (a tuple of another shape: the two
    # never compare equal).
    ops: list[list[tuple[int, object, int]]] = []
    collectives: list[list[tuple[int, object, int]]] = []
    needs = rules.needs
    for r, row in enumerate(s.ranks):
        mine, coll = [], []
        for n, a in enumerate(row):
            kind = a.kind
            if kind.is_collective:
                op = (ALL, a, n)
                coll.append(op)
            elif kind.is_p2p:
                peer, peer_action = needs(r, a).peer  # type: ignore[misc]
                op = (peer, (r, a) if kind is K.SEND_F or kind is K.SEND_B else (peer, peer_action), n)
            else:
                continue
            mine.append(op)
        ops.append(mine)
        collectives.append(coll)
    reference = [op[1] for op in collectives[0]] if s.p else []
    for r in range(1, s.p):
        if [op[1] for op in collectives[r]] != reference:
            conflict = _first_difference(s, rules, 0, r, collectives[0], collectives[r])
            if conflict is not None:
                return conflict
    linked = sorted({(r, op[0]) for r, row in enumerate(ops) for op in row if op[0] > r})
    for a, b in linked:
        seq_a = [op for op in ops[a] if op[0] == ALL or op[0] == b]
        seq_b = [op for op in ops[b] if op[0] == ALL or op[0] == a]
        if [op[1] for op in seq_a] != [op[1] for op in seq_b]:
            conflict = _first_difference(s, rules, a, b, seq_a, seq_b)
            if conflict is not None:
                return conflict
    return None


def _first_difference(
    s: Schedule, rules: ScheduleRules, a: int, b: int, seq_a: list, seq_b: list
) -> OrderConflict | None:
    where_a = {op[1]: op[2] for op in seq_a}
    where_b = {op[1]: op[2] for op in seq_b}
    for (_, key_a, n_a), (_, key_b, n_b) in zip(seq_a, seq_b, strict=False):
        if key_a != key_b:
            # a runs key_a first and key_b later; b runs key_b first and key_a later.
            later_a, later_b = where_a.get(key_b), where_b.get(key_a)
            if later_a is None or later_b is None:
                return None  # an operation is missing on one side: rule 1's job to report
            first = shared_op(rules, a, s.ranks[a][n_a])
            second = shared_op(rules, b, s.ranks[b][n_b])
            assert first is not None and second is not None
            return OrderConflict(a, b, first, second, (n_a, later_a), (later_b, n_b))
    return None
