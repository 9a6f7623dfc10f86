"""The collectives the vocabulary layers issue, behind a small injectable interface.

The layers never call `torch.distributed` directly: they take a `Communicator`. The real one wraps
a process group; tests wrap it in `CountingComm` to count what each algorithm issues (a
`ForwardingComm`, as the strict order check's StrictComm is), and the unit tests use the
in-process `ThreadGroup` (vptrain.vocab.inprocess). All ranks of a group must issue the same
collectives in the same order, or the job deadlocks.

Every collective returns a `Work` whose `wait()` completes it; with `async_op=False` the work is
already complete. `Pending` bundles works with the bookkeeping that must run once they complete
(e.g. turning gathered statistics into the global ones), so a caller can issue a phase, run other
passes, and only then wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

REDUCE_OPS = ("sum", "max")


class Work(Protocol):
    def wait(self) -> Any: ...


class Communicator(Protocol):
    """Collectives over the ranks that share the vocabulary; ranks are group-local."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> Work:
        """In place: every rank ends with the elementwise reduction (op 'sum' or 'max')."""
        ...

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False) -> Work:
        """output[r] = rank r's tensor; output has shape [world_size, *tensor.shape]."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Work:
        """In place: every rank ends with rank src's tensor."""
        ...

    def reduce(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Work:
        """In place sum onto rank dst; other ranks' tensors are undefined afterwards."""
        ...


class Done:
    """The work of a collective that already completed."""

    def wait(self) -> bool:
        return True


class Pending:
    """Works in flight plus what to do once they complete.

    `then` runs exactly once, on the first `wait()`; it may return another Pending (a collective it
    issued), which is then waited too. That is how alg2 chains its reduction after the statistics.
    `buffers` are the tensors the works read or write: held here until they complete (the
    collective needs them; holding them in Python keeps what is alive visible). `result`, if
    given, is the tensor the caller reads once waited (a reduce's output on its destination).
    """

    def __init__(
        self,
        works: Sequence[Work] = (),
        then: Callable[[], Pending | None] | None = None,
        *,
        buffers: Sequence[torch.Tensor] = (),
        result: torch.Tensor | None = None,
    ) -> None:
        self._works = list(works)
        self._then = then
        self._buffers = list(buffers)
        self.result = result
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        for work in self._works:
            work.wait()
        self._works.clear()
        self._buffers.clear()
        self._done = True
        if self._then is not None:
            then, self._then = self._then, None
            follow_up = then()
            if follow_up is not None:
                follow_up.wait()

    @property
    def done(self) -> bool:
        return self._done


def _reduce_op(op: str) -> dist.ReduceOp:
    if op == "sum":
        return dist.ReduceOp.SUM
    if op == "max":
        return dist.ReduceOp.MAX
    raise ValueError(f"unknown reduce op {op!r}; expected one of {REDUCE_OPS}")


class ProcessGroupComm:
    """A Communicator over a torch.distributed process group (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _global(self, group_rank: int) -> int:
        # torch.distributed addresses src/dst by global rank, our callers by group rank.
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @staticmethod
    def _work(work: Work | None) -> Work:
        return Done() if work is None else work

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> Work:
        return self._work(dist.all_reduce(tensor, op=_reduce_op(op), group=self.group, async_op=async_op))

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False) -> Work:
        if output.shape != (self._world_size, *tensor.shape):
            raise ValueError(f"all_gather output {tuple(output.shape)} for input {tuple(tensor.shape)}")
        # The list form works on every backend and torch version (gloo's tensor form wants a
        # flat dim 0); the list entries are views into `output`, so nothing is copied back.
        parts = list(output.unbind(0))
        return self._work(dist.all_gather(parts, tensor, group=self.group, async_op=async_op))

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Work:
        return self._work(dist.broadcast(tensor, self._global(src), group=self.group, async_op=async_op))

    def reduce(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Work:
        return self._work(dist.reduce(tensor, self._global(dst), group=self.group, async_op=async_op))


class ForwardingComm:
    """A Communicator that hands every call on to `inner`, calling `_before` first.

    Subclasses see each collective as (call, tensor, root) before it is issued: call is
    "all_reduce_<op>", "all_gather", "broadcast" or "reduce"; root the group rank of a broadcast's
    source or a reduce's destination, else None.
    """

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def _before(self, call: str, tensor: torch.Tensor, root: int | None) -> None:
        """Called before each collective is handed on."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> Work:
        self._before(f"all_reduce_{op}", tensor, None)
        return self.inner.all_reduce(tensor, op, async_op=async_op)

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False) -> Work:
        self._before("all_gather", tensor, None)
        return self.inner.all_gather(output, tensor, async_op=async_op)

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> Work:
        self._before("broadcast", tensor, src)
        return self.inner.broadcast(tensor, src, async_op=async_op)

    def reduce(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> Work:
        self._before("reduce", tensor, dst)
        return self.inner.reduce(tensor, dst, async_op=async_op)


class CountingComm(ForwardingComm):
    """Wraps a Communicator and appends ("collective", name, numel) to `events` for every call.

    Tests share `events` with a compute tracker to count barriers (runs of collectives with no
    compute pass in between).
    """

    def __init__(self, inner: Communicator, events: list[tuple[str, ...]] | None = None) -> None:
        super().__init__(inner)
        self.events: list[tuple[str, ...]] = [] if events is None else events

    def _before(self, call: str, tensor: torch.Tensor, root: int | None) -> None:
        self.events.append(("collective", call, str(tensor.numel())))

    @property
    def collectives(self) -> list[str]:
        return [event[1] for event in self.events if event[0] == "collective"]
