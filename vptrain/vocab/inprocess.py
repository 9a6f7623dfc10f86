"""An in-process Communicator: p threads stand in for p ranks (unit tests only).

It lets single-process tests run the production passes and phases exactly as a process group
would, shard by shard, with no ports or process start-up. Collective k of every rank is matched
with collective k of the others, as in a real group, and the group is strict about it: every rank
must issue the same operation there (kind, root, shape, dtype and, when the caller names it through
`ThreadComm.label`, the same schedule action), else the whole group fails at once with both ranks'
operations in the message, where NCCL would hang or mix data. A rank that returns while another
waits in a collective it never issued fails the group too, instead of a timeout.

Blocking `send`/`recv` between two thread-ranks let a test replay a whole schedule's communication.
Every rank's operations shared with each other rank (the transfers between the two, every
collective) are recorded in order, and the second rank to reach the k-th shared operation of a pair
checks that both name the same one: two ranks issuing their shared operations in different orders
fail loudly, naming both ranks and both operations (NCCL would hang; DESIGN.md invariant 5). Real
multi-process behaviour is tested with gloo (and vptrain.engine.strict_order).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class _Signature:
    """What every rank must agree on for one collective."""

    kind: str
    arg: Any  # broadcast source / reduce destination
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str | None  # the schedule action the caller is running, if it said

    def __str__(self) -> str:
        root = "" if self.arg is None else f"root {self.arg}, "
        shape = "x".join(map(str, self.shape)) or "scalar"
        label = f" for {self.label}" if self.label else ""
        return f"{self.kind}({root}{shape} {str(self.dtype).removeprefix('torch.')}){label}"


class _Slot:
    """One collective, filled in by every rank; the last rank to issue computes the results."""

    def __init__(self, first: int, signature: _Signature) -> None:
        self.first, self.signature = first, signature
        self.kind = signature.kind
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
        self._finished: set[int] = set()
        self._shared: dict[tuple[int, int], list[str]] = {}  # (rank, peer): what rank shared with peer, in order
        self._boxes: dict[tuple[int, int], deque[list]] = {}  # (src, dst): posted sends, [tensor, taken]

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def abort(self, reason: str) -> None:
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    def finished(self, rank: int) -> None:
        """Rank `rank` will issue nothing more: a collective still missing its input can never complete."""
        with self._cond:
            self._finished.add(rank)
            self._cond.notify_all()

    def _fail(self, message: str) -> RuntimeError:
        self._aborted = message
        self._cond.notify_all()
        return RuntimeError(message)

    def _check_alive(self) -> None:
        if self._aborted is not None:
            raise RuntimeError(f"thread group aborted: {self._aborted}")

    def _note_shared(self, rank: int, peers: list[int], what: str) -> None:
        """Record `what` as rank's next operation shared with each peer; the second of a pair to
        reach an index compares (the first cannot know yet). Called with the lock held."""
        for peer in peers:
            mine = self._shared.setdefault((rank, peer), [])
            k = len(mine)
            mine.append(what)
            theirs = self._shared.get((peer, rank), [])
            if k < len(theirs) and theirs[k] != what:
                raise self._fail(
                    f"ranks {peer} and {rank} issue the operations they share in different orders: their shared "
                    f"operation #{k} is {theirs[k]} on rank {peer} but {what} on rank {rank}"
                )

    def _wait(self, ready: Callable[[], bool], peers: Callable[[], list[int]], what: str, rank: int) -> None:
        """Wait until ready(), failing at once if the group aborts or one of peers() has returned."""
        ok = self._cond.wait_for(
            lambda: self._aborted is not None or ready() or bool(self._finished & set(peers())), self.timeout_s
        )
        self._check_alive()
        if ready():
            return
        gone = sorted(self._finished & set(peers()))
        if gone:
            raise self._fail(f"rank {rank} waits in {what}, but rank {gone[0]} returned without reaching it")
        assert not ok
        raise TimeoutError(f"rank {rank}: {what} timed out waiting for ranks {peers()}")

    def _send(self, rank: int, dst: int, tensor: torch.Tensor, what: str) -> None:
        with self._cond:
            self._check_alive()
            self._note_shared(rank, [dst], what)
            item = [tensor.detach().clone(), False]
            self._boxes.setdefault((rank, dst), deque()).append(item)
            self._cond.notify_all()
            self._wait(lambda: item[1], lambda: [dst], what, rank)  # a blocking rendezvous, as gloo's

    def _recv(self, rank: int, src: int, out: torch.Tensor, what: str) -> None:
        with self._cond:
            self._check_alive()
            self._note_shared(rank, [src], what)
            box = self._boxes.setdefault((src, rank), deque())
            self._wait(lambda: bool(box), lambda: [src], what, rank)
            item = box.popleft()
            out.copy_(item[0])
            item[1] = True
            self._cond.notify_all()

    def _issue(self, seq: int, rank: int, signature: _Signature, tensor: torch.Tensor, arg: Any) -> None:
        with self._cond:
            self._check_alive()
            slot = self._slots.setdefault(seq, _Slot(rank, signature))
            if slot.signature != signature:
                raise self._fail(
                    f"collective #{seq}: rank {slot.first} issued {slot.signature} but rank {rank} issued "
                    f"{signature}; every rank of a group must issue the same collectives in the same order"
                )
            self._note_shared(rank, [r for r in range(self.world_size) if r != rank], str(signature))
            # Snapshot now: an async caller may not touch the tensor before wait(), and a
            # snapshot keeps the other ranks' results independent of this rank's later writes.
            slot.inputs[rank] = (tensor.detach().clone(), arg)
            if len(slot.inputs) == self.world_size:
                slot.results = _combine(signature.kind, slot.inputs, self.world_size)
                self._cond.notify_all()

    def _complete(self, seq: int, rank: int) -> torch.Tensor | None:
        with self._cond:
            slot = self._slots[seq]

            def missing() -> list[int]:
                return [r for r in range(self.world_size) if r not in slot.inputs]

            self._wait(lambda: slot.results is not None, missing, f"collective #{seq} {slot.signature}", rank)
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
        self.label: str | None = None
        """The schedule action the caller is running (e.g. "EMB_REDUCE3"); every rank must agree."""

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._group.world_size

    def _run(self, kind: str, tensor: torch.Tensor, out: torch.Tensor, arg: Any, async_op: bool) -> _ThreadWork:
        seq, self._seq = self._seq, self._seq + 1
        signature = _Signature(kind, arg, tuple(tensor.shape), tensor.dtype, self.label)
        self._group._issue(seq, self._rank, signature, tensor, arg)
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

    # Point-to-point, blocking on both sides; `tag` names the transfer the same way on both ends.
    def send(self, tensor: torch.Tensor, dst: int, *, tag: str | None = None) -> None:
        self._group._send(self._rank, dst, tensor, _p2p_name(self._rank, dst, tensor, tag))

    def recv(self, tensor: torch.Tensor, src: int, *, tag: str | None = None) -> None:
        self._group._recv(self._rank, src, tensor, _p2p_name(src, self._rank, tensor, tag))


def _p2p_name(src: int, dst: int, tensor: torch.Tensor, tag: str | None) -> str:
    shape = "x".join(map(str, tensor.shape)) or "scalar"
    return f"p2p {src}->{dst}({shape} {str(tensor.dtype).removeprefix('torch.')})" + (f" for {tag}" if tag else "")


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
            group.finished(rank)
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
