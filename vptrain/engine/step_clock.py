"""Where a rank's step goes: host time in each kind of pipeline instruction.

The busy timer (common.BusyTimer) measures the compute inside the passes. This clock times every
instruction handler the engine executes, by kind, so a benchmark can split a step into

    busy        compute in the passes (BusyTimer)
    pass wait   the rest of the pass handlers: waiting inside a pass for a collective's result
                (the hidden-state broadcast in S, g in T, ∇X on the loss stage, ...), the release
                waits of send-only reduces, and the handlers' own Python
    p2p         send / receive handlers (gloo's are blocking: the time a peer is not yet there)
    collective  issuing the vocabulary collectives (and the waits an issue needs, e.g. SUM on MAX)
    optimizer   gradient reduction, clipping and the optimizer step
    other       the step's wall time minus all handlers: schedule generation, loss aggregation and
                the interpreter between instructions

It reads `time.perf_counter` on the host only: no device synchronisation, nothing added to a
pass's work. On a GPU the host runs ahead of the device, so there the split is of host time (where
the host waited), not of device time; the busy timer stays the device's measure.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

CATEGORIES = ("pass", "p2p", "collective", "optimizer", "other_instr")

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


class StepClock:
    """Host seconds per instruction kind since the last `take()`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, kind: str, handler):
        @functools.wraps(handler)
        def timed(engine, *args, **kwargs):
            start = time.perf_counter()
            try:
                return handler(engine, *args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        out = {kind: self.seconds.get(kind, 0.0) for kind in CATEGORIES}
        self.seconds.clear()
        return out


def install_step_clock(engine) -> StepClock:
    """Time every handler of `engine`'s instruction map. DeepSpeed looks each instruction up in
    `self._INSTRUCTION_MAP` when it runs it, so an instance-level map of wrapped handlers times all
    of them without another subclass per engine (1F1B, vocabulary, V-Half)."""
    clock = StepClock()
    handlers = type(engine)._INSTRUCTION_MAP
    engine._INSTRUCTION_MAP = {cls: clock.wrap(instruction_kind(cls), fn) for cls, fn in handlers.items()}
    return clock
