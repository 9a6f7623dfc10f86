"""A strict runtime check of DESIGN.md invariant 5: every two ranks issue the operations they share
(the transfers between them, every vocabulary collective) in one relative order.

Gloo forgives a violation (its collectives run asynchronously and its transfers match by peer), so
a gloo run cannot show one; NCCL hangs on it. With `train.strict_comm_order=true` every rank counts
the operations it shares with each other rank and, before each one runs, publishes "my k-th
operation shared with you is X" in the job's store, then waits for the peer's k-th and compares.
A mismatch raises `CommOrderError` on both ranks, naming both ranks and both operations, before
either issues the real operation; the failing rank also unblocks every rank waiting on it (an
ABORT record at each peer's next index), so all ranks of the pipeline fail at once instead of
hanging. The check sits outside the real communication, so it sees the order the engine issues in
whatever the backend tolerates: transfers are checked as the engine starts each SEND/RECV action,
collectives at every call on the vocabulary Communicator (`StrictComm`), labelled with the action
that makes it.

Checking turns every shared operation into a rendezvous of the ranks that share it, as a kernel
that blocks its device would (e.g. CUDA_DEVICE_MAX_CONNECTIONS=1): the lowering's global order
makes that deadlock-free too (vptrain/schedule/lower.py), and a timeout names who waits for whom.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from vptrain.schedule.ir import parse_action
from vptrain.schedule.order import shared_op
from vptrain.schedule.rules import ScheduleRules
from vptrain.vocab.comm import Communicator, ForwardingComm

ABORT = "ABORT"


class CommOrderError(RuntimeError):
    """Two ranks issued the operations they share in different orders (or one never reached its)."""


class OrderChecker:
    """One rank's side of the check. `pipeline[s]` is the global rank of stage s of this rank's
    pipeline (the vocabulary group and every transfer stay inside it)."""

    def __init__(self, store: dist.Store, *, rank: int, stage: int, pipeline: tuple[int, ...],
                 rules: ScheduleRules, timeout_s: float) -> None:
        self.rank, self.stage, self.pipeline, self.rules = rank, stage, pipeline, rules
        self.timeout = timedelta(seconds=timeout_s)
        # A fresh namespace per checker: every rank creates one per trainer, so the n-th checker of
        # every rank shares namespace n and a later trainer in the same job never reads stale records.
        generation = store.add(f"vptrain-comm-order/generation/{rank}", 1)
        self.store = dist.PrefixStore(f"vptrain-comm-order/{generation}", store)
        self.sent = dict.fromkeys(pipeline, 0)  # operations shared with each peer so far
        self.current = "(before the first action)"
        self.checked = 0

    @classmethod
    def for_default_group(cls, **kwargs) -> OrderChecker:
        """A checker on the store of the default process group (the job's rendezvous store)."""
        from torch.distributed.distributed_c10d import _get_default_store

        return cls(_get_default_store(), **kwargs)

    def action(self, text: str) -> None:
        """The engine starts schedule action `text` (called before any communication it makes)."""
        self.current = text
        a = parse_action(text)
        if a.kind.is_p2p:
            op = shared_op(self.rules, self.stage, a)
            assert op is not None
            self._shared([self.pipeline[op.peer]], op.describe(), text)

    def collective(self, call: str) -> None:
        """A call on the vocabulary group is about to be issued by the current action."""
        peers = [r for r in self.pipeline if r != self.rank]
        self._shared(peers, f"{self.current}: {call}", f"{call} in {self.current}")

    def _shared(self, peers: list[int], name: str, local: str) -> None:
        """Publish `name` as the next operation shared with each peer, then compare with theirs."""
        index = {peer: self.sent[peer] for peer in peers}
        self.store.multi_set([self._key(self.rank, peer, index[peer]) for peer in peers],
                             [f"{name}\n{local}" for _ in peers])
        for peer in peers:
            self.sent[peer] += 1
        for peer in peers:
            key = self._key(peer, self.rank, index[peer])
            try:
                self.store.wait([key], self.timeout)
            except dist.DistStoreError:
                self._fail(f"rank {self.rank} (stage {self.stage}) waited {self.timeout.total_seconds():.0f} s at "
                           f"{local} for rank {peer}'s shared operation #{index[peer]} with it, which never came: "
                           "a deadlock or a rank that stopped")
            theirs, _, their_local = self.store.get(key).decode().partition("\n")
            if theirs == ABORT:
                self._fail(f"rank {self.rank} (stage {self.stage}) stops at {local}: {their_local}")
            if theirs != name:
                self._fail(f"ranks {self.rank} and {peer} issue the operations they share in different orders: "
                           f"their shared operation #{index[peer]} is {local} on rank {self.rank} (stage "
                           f"{self.stage}) but {their_local} on rank {peer} ({name!r} vs {theirs!r})")
        self.checked += 1

    def _fail(self, message: str) -> None:
        # Whoever waits for this rank waits for its next record: make that record an abort.
        peers = [r for r in self.pipeline if r != self.rank]
        self.store.multi_set([self._key(self.rank, peer, self.sent[peer]) for peer in peers],
                             [f"{ABORT}\n{message}" for _ in peers])
        raise CommOrderError(message)

    @staticmethod
    def _key(src: int, dst: int, index: int) -> str:
        return f"{src}>{dst}/{index}"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) + " " + str(t.dtype).removeprefix("torch.")


class StrictComm(ForwardingComm):
    """A Communicator that checks every call with an OrderChecker before making it."""

    def __init__(self, inner: Communicator, checker: OrderChecker) -> None:
        super().__init__(inner)
        self.checker = checker

    def _before(self, call: str, tensor: torch.Tensor, root: int | None) -> None:
        root_text = "" if root is None else f"root {root}, "
        self.checker.collective(f"{call}({root_text}{_shape(tensor)})")


class OrderCheckHook:
    """Mixed into an engine in front of VocabPassesMixin: reports every action to the plan's
    OrderChecker (if any) as it starts, before its transfers or collectives."""

    def _record(self, action: str) -> None:
        checker = self.plan.order_check
        if checker is not None:
            checker.action(action)
        super()._record(action)
