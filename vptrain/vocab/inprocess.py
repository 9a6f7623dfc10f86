"""An in-process Communicator: p threads stand in for p ranks (unit tests only).

It lets single-process tests run the production passes and phases exactly as a process group
would, shard by shard, with no ports or process start-up. Collective k of every rank is matched
with collective k of the others, as in a real group; a mismatch (different op on different ranks)
raises instead of silently mixing data. Real multi-process behaviour is tested with gloo.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class _Slot:
    """One collective, filled in by every rank; the last rank to issue computes the results."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.inputs: dict[int, tuple[torch.Tensor, Any]] = {}
        self.results: dict[int, torch.Tensor | None] | None = None
        self.collected = 0


class ThreadGroup:
    """Shared state of p thread-ranks. `comm(r)` is rank r's Communicator."""

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._aborted: str | None = None

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def abort(self, reason: str) -> None:
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    def _issue(self, seq: int, rank: int, kind: str, tensor: torch.Tensor, arg: Any) -> None:
        with self._cond:
            slot = self._slots.setdefault(seq, _Slot(kind))
            if slot.kind != kind:
                self._aborted = f"collective #{seq}: rank {rank} issued {kind}, another rank {slot.kind}"
                self._cond.notify_all()
                raise RuntimeError(self._aborted)
            # Snapshot now: an async caller may not touch the tensor before wait(), and a
            # snapshot keeps the other ranks' results independent of this rank's later writes.
            slot.inputs[rank] = (tensor.detach().clone(), arg)
            if len(slot.inputs) == self.world_size:
                slot.results = _combine(kind, slot.inputs, self.world_size)
                self._cond.notify_all()

    def _complete(self, seq: int, rank: int) -> torch.Tensor | None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._aborted is not None or self._slots[seq].results is not None, self.timeout_s
            )
            if self._aborted is not None:
                raise RuntimeError(f"thread group aborted: {self._aborted}")
            if not ok:
                raise TimeoutError(f"collective #{seq} ({self._slots[seq].kind}) timed out: a rank never issued it")
            slot = self._slots[seq]
            assert slot.results is not None
            result = slot.results[rank]
            slot.collected += 1
            if slot.collected == self.world_size:
                del self._slots[seq]
            return result


def _combine(kind: str, inputs: dict[int, tuple[torch.Tensor, Any]], n: int) -> dict[int, torch.Tensor | None]:
    tensors = [inputs[r][0] for r in range(n)]
    arg = inputs[0][1]
    if kind in ("all_reduce_sum", "all_reduce_max"):
        stacked = torch.stack(tensors)
        total = stacked.sum(0) if kind == "all_reduce_sum" else stacked.amax(0)
        return dict.fromkeys(range(n), total)
    if kind == "all_gather":
        return dict.fromkeys(range(n), torch.stack(tensors))
    if kind == "broadcast":
        return dict.fromkeys(range(n), tensors[arg])
    if kind == "reduce":
        total = torch.stack(tensors).sum(0)
        return {r: (total if r == arg else None) for r in range(n)}
    raise ValueError(kind)


class _ThreadWork:
    def __init__(self, group: ThreadGroup, seq: int, rank: int, out: torch.Tensor) -> None:
        self._group, self._seq, self._rank, self._out = group, seq, rank, out
        self._done = False

    def wait(self) -> bool:
        if not self._done:
            result = self._group._complete(self._seq, self._rank)
            if result is not None:
                self._out.copy_(result)
            self._done = True
        return True


class ThreadComm:
    """Rank `rank` of a ThreadGroup (Communicator protocol)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank
        self._seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._group.world_size

    def _run(self, kind: str, tensor: torch.Tensor, out: torch.Tensor, arg: Any, async_op: bool) -> _ThreadWork:
        seq, self._seq = self._seq, self._seq + 1
        self._group._issue(seq, self._rank, kind, tensor, arg)
        work = _ThreadWork(self._group, seq, self._rank, out)
        if not async_op:
            work.wait()
        return work

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> _ThreadWork:
        if op not in ("sum", "max"):
            raise ValueError(op)
        return self._run(f"all_reduce_{op}", tensor, tensor, None, async_op)

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, async_op: bool = False) -> _ThreadWork:
        return self._run("all_gather", tensor, output, None, async_op)

    def broadcast(self, tensor: torch.Tensor, src: int, *, async_op: bool = False) -> _ThreadWork:
        return self._run("broadcast", tensor, tensor, src, async_op)

    def reduce(self, tensor: torch.Tensor, dst: int, *, async_op: bool = False) -> _ThreadWork:
        return self._run("reduce", tensor, tensor, dst, async_op)


def run_in_threads(world_size: int, fn: Callable[[int, ThreadComm], T], timeout_s: float = 60.0) -> list[T]:
    """Run fn(rank, comm) on world_size threads sharing one ThreadGroup; results in rank order.

    An exception on any rank aborts the group (so the others do not wait for the timeout) and is
    re-raised here.
    """
    group = ThreadGroup(world_size, timeout_s)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.comm(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = exc
            group.abort(f"rank {rank} raised {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=body, args=(r,), name=f"vocab-rank{r}") for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Report the first rank that failed on its own, not the ranks that were aborted because of it.
    first = [e for e in errors if e is not None and "thread group aborted" not in str(e)]
    first = first or [e for e in errors if e is not None]
    if first:
        raise first[0]
    return results
