"""The step clock attributes each instruction handler's host time to its kind, for every handler of
an engine's instruction map, and leaves the class's map and the handlers' results untouched. It
tells time blocked (asleep, as in a gloo wait) from work on the CPU and from time waiting for a core,
and times the whole step.

The handlers advance a scripted clock instead of sleeping or spinning, so every figure is exact and
no assertion depends on how loaded the machine is (a real spin once read 11 ms of 20 as blocked)."""

from __future__ import annotations

import pytest
from deepspeed.runtime.pipe import schedule as ds

from vptrain.engine.step_clock import CATEGORIES, DESCHEDULED, STEP, ThreadClock, install_step_clock


class _ScriptedClock(ThreadClock):
    """A thread clock that moves only when a handler says: wall, on-CPU and run-queue seconds."""

    def __init__(self) -> None:
        self.wall = self.on_cpu = self.queued = 0.0
        self._fd = None

    def advance(self, *, on_cpu: float = 0.0, queued: float = 0.0, blocked: float = 0.0) -> None:
        self.wall += on_cpu + queued + blocked
        self.on_cpu += on_cpu
        self.queued += queued

    def read(self) -> tuple[float, float, float]:
        return self.wall, self.on_cpu, self.queued


# Binary fractions: sums of them are exact in floating point, so the test compares with ==.
COMPUTE = dict(on_cpu=0.25, queued=0.125)  # a pass: on the CPU, part of it waiting for a core
WAIT = dict(on_cpu=0.0078125, blocked=0.5)  # a p2p handler: asleep in a peer wait


class _Engine:
    """The part of DeepSpeed's PipelineEngine the clock relies on: handlers looked up by instruction
    type in `self._INSTRUCTION_MAP` and bound to the engine, and `train_batch` running a step."""

    def __init__(self) -> None:
        self.clock = _ScriptedClock()

    def _forward(self, buffer_id):
        self.clock.advance(**COMPUTE)
        return ("F", buffer_id)

    def _send(self, buffer_id):
        self.clock.advance(**WAIT)
        return ("SEND", buffer_id)

    _INSTRUCTION_MAP = {ds.ForwardPass: _forward, ds.SendActivation: _send, ds.LoadMicroBatch: _send}

    def run(self, instruction):
        return self._INSTRUCTION_MAP[type(instruction)](self, **instruction.kwargs)

    def train_batch(self, instructions):
        self.clock.advance(on_cpu=0.0625, blocked=0.03125)  # DeepSpeed's own work around the handlers
        return [self.run(i) for i in instructions]


def _installed() -> tuple[_Engine, object]:
    engine = _Engine()
    return engine, install_step_clock(engine, engine.clock)


def test_every_handler_is_timed_under_its_kind() -> None:
    engine, clock = _installed()
    assert _Engine._INSTRUCTION_MAP[ds.ForwardPass] is _Engine._forward  # the class keeps its own map
    assert engine.run(ds.ForwardPass(buffer_id=3)) == ("F", 3)
    assert engine.run(ds.SendActivation(buffer_id=1)) == ("SEND", 1)
    engine.run(ds.LoadMicroBatch(buffer_id=0))
    seconds = clock.take()
    kept = {*CATEGORIES, *(f"blocked_{k}" for k in CATEGORIES), *(f"descheduled_{k}" for k in DESCHEDULED), *STEP}
    assert set(seconds) == kept
    assert seconds["pass"] == 0.375 and seconds["p2p"] == 0.5078125
    assert seconds["other_instr"] == 0.5078125  # LoadMicroBatch: timed, under no named kind
    assert seconds["collective"] == seconds["optimizer"] == 0.0
    assert seconds["step"] == 0.0  # no train_batch ran
    assert clock.take()["pass"] == 0.0  # take() starts the next step from zero


def test_blocked_time_is_told_from_work_and_from_waiting_for_a_core() -> None:
    engine, clock = _installed()
    engine.run(ds.SendActivation(buffer_id=0))
    engine.run(ds.ForwardPass(buffer_id=0))
    engine.run(ds.ForwardPass(buffer_id=1))
    seconds = clock.take()
    assert seconds["blocked_p2p"] == 0.5  # asleep: blocked, less the call's own CPU time
    assert seconds["blocked_pass"] == 0.0  # on the CPU or waiting for it: never blocked
    assert seconds["descheduled_pass"] == 0.25  # the run-queue wait, kept apart
    assert seconds["pass"] == 0.75


def test_the_step_is_timed_around_train_batch() -> None:
    engine, clock = _installed()
    result = engine.train_batch([ds.ForwardPass(buffer_id=0), ds.SendActivation(buffer_id=1)])
    assert result == [("F", 0), ("SEND", 1)]
    seconds = clock.take()
    assert seconds["step"] == 0.09375 + 0.375 + 0.5078125  # the handlers lie inside the step
    assert seconds["step_blocked"] == 0.03125 + 0.5
    assert seconds["step_descheduled"] == 0.125


def test_a_span_that_never_blocked_is_not_counted_below_zero() -> None:
    """The real counters are read a few ns apart, so on-CPU can exceed wall by a hair."""
    engine, clock = _installed()

    def overshoot(engine_, buffer_id):
        engine_.clock.on_cpu += 1e-9
        return buffer_id

    engine._INSTRUCTION_MAP[ds.ForwardPass] = clock.wrap("pass", overshoot)
    engine.run(ds.ForwardPass(buffer_id=0))
    assert clock.take()["blocked_pass"] == 0.0


def test_the_real_thread_clock_reads_its_own_thread() -> None:
    """No timing assertion: the three counters exist, are non-negative and never run backwards."""
    real = ThreadClock()
    first = real.read()
    sum(i * i for i in range(10_000))
    second = real.read()
    assert all(value >= 0.0 for value in first)
    assert all(b >= a for a, b in zip(first, second, strict=True))
    if not real.sees_run_queue:
        pytest.skip("no /proc/thread-self/schedstat here: the run-queue counter reads 0")
    real.close()
    assert not real.sees_run_queue
