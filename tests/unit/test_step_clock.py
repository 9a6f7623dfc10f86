"""The step clock attributes each instruction handler's host time to its kind, for every handler of
an engine's instruction map, and leaves the class's map and the handlers' results untouched. It
tells time blocked (asleep, as in a gloo wait) from work on the CPU, and times the whole step."""

from __future__ import annotations

import time

import pytest
from deepspeed.runtime.pipe import schedule as ds

from vptrain.engine.step_clock import CATEGORIES, DESCHEDULED, STEP, ThreadClock, install_step_clock

SLEEP_S = 0.1
# Large against the clocks' fixed error: at 0.02 s a loaded 2-core run once counted 11 ms of a pure
# spin as blocked (schedstat's run-queue figure lags the thread's own clock by a scheduler tick or so).


def _spin(seconds: float) -> None:
    """Work on the CPU for `seconds` of this thread's CPU time (never blocks)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _Engine:
    """The part of DeepSpeed's PipelineEngine the clock relies on: handlers looked up by instruction
    type in `self._INSTRUCTION_MAP` and bound to the engine, and `train_batch` running a step."""

    def _forward(self, buffer_id):
        _spin(SLEEP_S)  # compute: on the CPU
        return ("F", buffer_id)

    def _send(self, buffer_id):
        time.sleep(SLEEP_S)  # a blocking wait for a peer: off the CPU
        return ("SEND", buffer_id)

    _INSTRUCTION_MAP = {ds.ForwardPass: _forward, ds.SendActivation: _send, ds.LoadMicroBatch: _send}

    def run(self, instruction):
        return self._INSTRUCTION_MAP[type(instruction)](self, **instruction.kwargs)

    def train_batch(self, instructions):
        return [self.run(i) for i in instructions]


def test_every_handler_is_timed_under_its_kind() -> None:
    engine = _Engine()
    clock = install_step_clock(engine)
    assert _Engine._INSTRUCTION_MAP[ds.ForwardPass] is _Engine._forward  # the class keeps its own map
    assert engine.run(ds.ForwardPass(buffer_id=3)) == ("F", 3)
    assert engine.run(ds.SendActivation(buffer_id=1)) == ("SEND", 1)
    engine.run(ds.LoadMicroBatch(buffer_id=0))
    seconds = clock.take()
    kept = {*CATEGORIES, *(f"blocked_{k}" for k in CATEGORIES), *(f"descheduled_{k}" for k in DESCHEDULED), *STEP}
    assert set(seconds) == kept
    # Each sleep or spin lies inside its handler, so its kind holds at least that long.
    assert seconds["pass"] >= SLEEP_S and seconds["p2p"] >= SLEEP_S
    assert seconds["other_instr"] >= SLEEP_S  # LoadMicroBatch: timed, under no named kind
    assert seconds["collective"] == seconds["optimizer"] == 0.0
    assert seconds["step"] == 0.0  # no train_batch ran
    assert clock.take()["pass"] == 0.0  # take() starts the next step from zero


def test_blocked_time_is_told_from_work() -> None:
    engine = _Engine()
    clock = install_step_clock(engine)
    engine.run(ds.SendActivation(buffer_id=0))
    engine.run(ds.ForwardPass(buffer_id=0))
    seconds = clock.take()
    # Asleep: nearly all of the sleep is blocked (a few µs of it run the call on the CPU).
    assert seconds["blocked_p2p"] >= SLEEP_S / 2
    if not ThreadClock().sees_run_queue:
        pytest.skip("no /proc/thread-self/schedstat: time waiting for a core cannot be told from blocked time")
    # Spinning: on the CPU or waiting for it, never blocked, however loaded the machine.
    assert seconds["blocked_pass"] < SLEEP_S / 2
    assert 0.0 <= seconds["descheduled_pass"] <= seconds["pass"]


def test_the_step_is_timed_around_train_batch() -> None:
    engine = _Engine()
    clock = install_step_clock(engine)
    result = engine.train_batch([ds.ForwardPass(buffer_id=0), ds.SendActivation(buffer_id=1)])
    assert result == [("F", 0), ("SEND", 1)]
    seconds = clock.take()
    assert seconds["step"] >= seconds["pass"] + seconds["p2p"]  # the handlers lie inside the step
    assert seconds["step"] >= seconds["step_blocked"] >= SLEEP_S / 2  # the sleep, seen from the step
    assert 0.0 <= seconds["step_descheduled"] <= seconds["step"]
