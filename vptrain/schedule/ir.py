"""Schedule IR: one enum of pass kinds, a frozen `Action`, a `Schedule`, and their text form.

A schedule is data: for every pipeline rank, the ordered tuple of actions that rank executes, one at
a time. Compute passes, point-to-point transfers and vocabulary collectives are all actions, so the
engine runs exactly what the validator and the simulator have seen (the lesson of torch's pipelining
module, whose descriptive pipeline order drifted from the code that ran).

Text form of one action: KIND, microbatch, then ".chunk" only when the chunk is not 0::

    F3  B3  F3.1 (chunk 1 of a V-Half rank)  S2  T2  IF0  IB1  SEND_F3  RECV_B0.1  X_BCAST4

Text form of a schedule (`format_schedule` / `parse_schedule` round-trip exactly)::

    # vptrain schedule
    # method=vocab-2 schedule=1f1b p=2 m=4 chunks=1
    0: IF0 EMB_REDUCE0 F0 SEND_F0 ...
    1: IF0 EMB_REDUCE0 RECV_F0 F0 ...

Inspired by torch.distributed.pipelining's `_Action` (compact text that round-trips) and the
zero-bubble scheduler's `FuncType` (vocabulary passes as first-class node kinds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class Category(Enum):
    COMPUTE = "compute"
    P2P = "p2p"
    COLLECTIVE = "collective"


class PassKind(Enum):
    """Every kind of action a rank can execute. Each consumer (validator, simulator, renderer,
    engine) must handle all of them; `tests/unit/test_schedule_kinds.py` loops over this enum."""

    # Transformer chunk forward / backward (W is reserved for a future weight-gradient split).
    F = "F"
    B = "B"
    W = "W"
    # Output layer shard: S = logits + local softmax statistics, T = its backward (vp_algorithms §2.3).
    S = "S"
    T = "T"
    # Input layer shard: lookup of the rank's rows (IF) and scatter-add of the gradient (IB).
    IF = "IF"
    IB = "IB"
    # Blocking point-to-point rendezvous between adjacent pipeline stages.
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    # Asynchronous collectives over the vocabulary group (all pp ranks of one pipeline).
    X_BCAST = "X_BCAST"
    MAX = "MAX"
    SUM = "SUM"
    STATS = "STATS"
    G_BCAST = "G_BCAST"
    DXHAT = "DXHAT"
    DX_REDUCE = "DX_REDUCE"
    EMB_REDUCE = "EMB_REDUCE"
    DEMB_BCAST = "DEMB_BCAST"

    # Set for every member right after the class (plain attributes: the simulator reads them in
    # its inner loop).
    category: Category
    is_compute: bool
    is_p2p: bool
    is_collective: bool

    # Members are singletons, so identity hashing is exact and much cheaper than Enum's default.
    __hash__ = object.__hash__


_P2P_NAMES = frozenset({"SEND_F", "RECV_F", "SEND_B", "RECV_B"})
_COLLECTIVE_NAMES = frozenset(
    {"X_BCAST", "MAX", "SUM", "STATS", "G_BCAST", "DXHAT", "DX_REDUCE", "EMB_REDUCE", "DEMB_BCAST"}
)
for _kind in PassKind:
    _kind.category = (
        Category.P2P
        if _kind.value in _P2P_NAMES
        else Category.COLLECTIVE
        if _kind.value in _COLLECTIVE_NAMES
        else Category.COMPUTE
    )
    _kind.is_compute = _kind.category is Category.COMPUTE
    _kind.is_p2p = _kind.category is Category.P2P
    _kind.is_collective = _kind.category is Category.COLLECTIVE

# Kinds that carry a chunk index; every other kind is per microbatch and always has chunk 0.
CHUNKED_KINDS = frozenset({PassKind.F, PassKind.B, PassKind.W} | {k for k in PassKind if k.is_p2p})


class Action(NamedTuple):
    """One step of one rank: `kind` applied to `microbatch` (and model `chunk` for F/B/W/p2p).
    Immutable; a NamedTuple rather than a dataclass because the simulator hashes hundreds of
    thousands of them for the largest schedules."""

    kind: PassKind
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        suffix = f".{self.chunk}" if self.chunk else ""
        return f"{self.kind.value}{self.microbatch}{suffix}"


_ACTION_RE = re.compile(r"^([A-Z_]+?)(\d+)(?:\.(\d+))?$")


def parse_action(text: str) -> Action:
    """`"F3.1"` -> Action(F, 3, 1). Raises ValueError on anything else."""
    match = _ACTION_RE.match(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not an action (expected e.g. F3, B3.1, IF0, X_BCAST2)")
    name, mb, chunk = match.groups()
    try:
        kind = PassKind(name)
    except ValueError:
        known = ", ".join(k.value for k in PassKind)
        raise ValueError(f"'{text}': unknown pass kind '{name}'; known kinds: {known}") from None
    chunk_index = int(chunk) if chunk else 0
    if chunk_index and kind not in CHUNKED_KINDS:
        raise ValueError(f"'{text}': {name} is per microbatch and takes no chunk")
    return Action(kind, int(mb), chunk_index)


from vptrain.schedule.kinds import SCHEDULE_NAMES  # noqa: E402, F401  (re-exported for old importers)


class ScheduleError(ValueError):
    """A schedule breaks a rule; the message names the rule and shows the grid with the offending
    cell(s) marked as >B3<."""


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus what is needed to interpret them.

    `ranks[r]` is what pipeline rank r executes, in order. `name` fixes the stage placement and
    whether the backward is split into B and W (kinds.py: 1f1b and zb-h1 put stage r on rank r,
    vhalf puts stages r and 2p-1-r on rank r as chunks 0 and 1) and `method` fixes which
    vocabulary passes and collectives exist (see `rules.MethodRules`).
    """

    ranks: tuple[tuple[Action, ...], ...]
    method: str
    name: str
    num_microbatches: int
    chunks: int

    @property
    def p(self) -> int:
        return len(self.ranks)

    def compute_only(self) -> tuple[tuple[Action, ...], ...]:
        return tuple(tuple(a for a in row if a.kind.is_compute) for row in self.ranks)


_HEADER = "# vptrain schedule"


def format_schedule(s: Schedule) -> str:
    """The round-trippable text form: a header, a metadata line and one line per rank."""
    lines = [
        _HEADER,
        f"# method={s.method} schedule={s.name} p={s.p} m={s.num_microbatches} chunks={s.chunks}",
    ]
    lines += [f"{rank}: " + " ".join(str(a) for a in row) for rank, row in enumerate(s.ranks)]
    return "\n".join(lines) + "\n"


def parse_schedule(text: str) -> Schedule:
    """Inverse of `format_schedule`. Blank lines and extra `#` comment lines are ignored."""
    meta: dict[str, str] = {}
    rows: dict[int, tuple[Action, ...]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line == _HEADER:
            continue
        if line.startswith("#"):
            for token in line[1:].split():
                if "=" in token:
                    key, value = token.split("=", 1)
                    meta[key] = value
            continue
        head, sep, body = line.partition(":")
        if not sep or not head.strip().isdigit():
            raise ValueError(f"line {number}: expected '<rank>: <actions>', got '{line}'")
        rank = int(head)
        if rank in rows:
            raise ValueError(f"line {number}: rank {rank} appears twice")
        rows[rank] = tuple(parse_action(tok) for tok in body.split())
    missing = [k for k in ("method", "schedule", "m", "chunks") if k not in meta]
    if missing:
        raise ValueError(f"schedule text lacks metadata {missing} (line '# method=... schedule=... m=...')")
    p = int(meta.get("p", len(rows)))
    if sorted(rows) != list(range(p)):
        raise ValueError(f"expected rank lines 0..{p - 1}, found {sorted(rows)}")
    return Schedule(
        ranks=tuple(rows[r] for r in range(p)),
        method=meta["method"],
        name=meta["schedule"],
        num_microbatches=int(meta["m"]),
        chunks=int(meta["chunks"]),
    )


def collective_order(s: Schedule) -> list[Action]:
    """The vocabulary collectives in the order every rank issues them (rank 0's order; the
    validator guarantees all ranks agree). The engine can pre-create buffers from it."""
    return [a for a in s.ranks[0] if a.kind.is_collective] if s.ranks else []


def rank_actions(s: Schedule, rank: int) -> tuple[Action, ...]:
    """What pipeline rank `rank` executes, in order."""
    return s.ranks[rank]
