"""Where a rank's step goes: host time in each kind of pipeline instruction, and how much of it the
rank spent blocked on a peer or descheduled.

The busy timer (common.BusyTimer) measures the compute inside the passes. This clock times every
instruction handler the engine executes, by kind, and the whole `train_batch`, so a benchmark can
split a step into

    busy        compute in the passes (BusyTimer)
    optimizer   gradient reduction, clipping and the optimizer step, less the time blocked in them
    waits       time blocked on a peer: in p2p handlers, in pass and collective handlers (a pass
                waiting for a collective's result, a send-only reduce's release), in the optimizer
                (the norm's all-reduce at the drain) and outside any handler (DeepSpeed's loss
                broadcast after the step)
    host        the rest: the handlers' and DeepSpeed's own Python, issuing gloo operations

Blocked time is told apart from work by the thread's scheduler accounting: wall = on-CPU + waiting
on the run queue (another process holds the core) + blocked (gloo's waits sleep, they do not spin).
The run-queue part ("descheduled") comes from /proc/thread-self/schedstat where the kernel keeps
it; elsewhere it reads 0 and is counted as blocked.

Everything is host time read on the host: no device synchronisation, nothing added to a pass's
work. On a GPU the host runs ahead of the device, so there the split is of host time (where the host
waited), not of device time; the busy timer stays the device's measure.
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict

CATEGORIES = ("pass", "p2p", "collective", "optimizer", "other_instr")
STEP = ("step", "step_blocked", "step_descheduled")
"""Per step: train_batch's wall time, the part of it blocked on a peer, the part descheduled."""
DESCHEDULED = ("pass", "optimizer")
"""Kinds whose descheduled time is kept too (`descheduled_<kind>`): the work a benchmark compares
across methods, whose wall time other processes inflate."""

_KIND_OF = {
    "ForwardPass": "pass",
    "BackwardPass": "pass",
    "InputForward": "pass",
    "InputBackward": "pass",
    "OutputForward": "pass",
    "OutputBackward": "pass",
    "SendActivation": "p2p",
    "RecvActivation": "p2p",
    "SendGrad": "p2p",
    "RecvGrad": "p2p",
    "VocabCollective": "collective",
    "OptimizerStep": "optimizer",
    "ReduceGrads": "optimizer",
    "ReduceTiedGrads": "optimizer",
}


def instruction_kind(cls: type) -> str:
    return _KIND_OF.get(cls.__name__, "other_instr")


class ThreadClock:
    """(wall, on-CPU, run-queue wait) seconds of the thread that created it, since an arbitrary origin."""

    SCHEDSTAT = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        try:  # opened once: /proc/thread-self resolves to this thread when opened
            self._fd: int | None = os.open(self.SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self._fd = None

    @property
    def sees_run_queue(self) -> bool:
        return self._fd is not None

    def read(self) -> tuple[float, float, float]:
        # On-CPU from the thread's CPU clock, which the kernel brings up to date when read;
        # schedstat's own on-CPU figure lags by up to a scheduler tick while the thread runs. Its
        # run-queue wait only grows while the thread waits, so it is current whenever we read it.
        wall, on_cpu = time.perf_counter(), time.thread_time()
        if self._fd is None:
            return wall, on_cpu, 0.0
        return wall, on_cpu, int(os.pread(self._fd, 64, 0).split()[1]) * 1e-9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


class StepClock:
    """Host seconds per instruction kind (and blocked seconds per kind, `blocked_<kind>`, and for
    DESCHEDULED the seconds off the core) since the last `take()`, with the step's totals (STEP)."""

    def __init__(self, thread_clock: ThreadClock | None = None) -> None:
        self.clock = thread_clock or ThreadClock()
        self.seconds: dict[str, float] = defaultdict(float)

    def _span(self, fn, names: tuple[str, str, str | None], *args, **kwargs):
        wall0, cpu0, queued0 = self.clock.read()
        try:
            return fn(*args, **kwargs)
        finally:
            wall1, cpu1, queued1 = self.clock.read()
            wall, queued = wall1 - wall0, queued1 - queued0
            total, blocked, descheduled = names
            self.seconds[total] += wall
            # Clamped: the three counters are read a few ns apart, so a span that never blocked
            # can come out a hair below zero.
            self.seconds[blocked] += max(0.0, wall - (cpu1 - cpu0) - queued)
            if descheduled is not None:
                self.seconds[descheduled] += queued

    def wrap(self, kind: str, handler):
        names = (kind, f"blocked_{kind}", f"descheduled_{kind}" if kind in DESCHEDULED else None)

        @functools.wraps(handler)
        def timed(engine, *args, **kwargs):
            return self._span(handler, names, engine, *args, **kwargs)

        return timed

    def wrap_step(self, train_batch):
        @functools.wraps(train_batch)
        def timed(*args, **kwargs):
            return self._span(train_batch, STEP, *args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        keys = [*CATEGORIES, *(f"blocked_{k}" for k in CATEGORIES), *(f"descheduled_{k}" for k in DESCHEDULED), *STEP]
        out = {key: self.seconds.get(key, 0.0) for key in keys}
        self.seconds.clear()
        return out


def install_step_clock(engine, thread_clock: ThreadClock | None = None) -> StepClock:
    """Time every handler of `engine`'s instruction map, and its `train_batch`. DeepSpeed looks each
    instruction up in `self._INSTRUCTION_MAP` when it runs it, so an instance-level map of wrapped
    handlers times all of them without another subclass per engine (1F1B, vocabulary, V-Half).
    Must be called on the thread that runs the steps (the run-queue counter is that thread's);
    `thread_clock` replaces the thread's real clock (tests drive a scripted one)."""
    clock = StepClock(thread_clock)
    handlers = type(engine)._INSTRUCTION_MAP
    engine._INSTRUCTION_MAP = {cls: clock.wrap(instruction_kind(cls), fn) for cls, fn in handlers.items()}
    if hasattr(engine, "train_batch"):
        engine.train_batch = clock.wrap_step(engine.train_batch)
    return clock
