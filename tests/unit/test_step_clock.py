"""The step clock attributes each instruction handler's host time to its kind, for every handler of
an engine's instruction map, and leaves the class's map and the handlers' results untouched."""

from __future__ import annotations

import time

from deepspeed.runtime.pipe import schedule as ds

from vptrain.engine.step_clock import CATEGORIES, install_step_clock


class _Engine:
    """The part of DeepSpeed's PipelineEngine the clock relies on: handlers looked up by instruction
    type in `self._INSTRUCTION_MAP` and bound to the engine."""

    def _forward(self, buffer_id):
        time.sleep(0.02)
        return ("F", buffer_id)

    def _send(self, buffer_id):
        time.sleep(0.001)
        return ("SEND", buffer_id)

    _INSTRUCTION_MAP = {ds.ForwardPass: _forward, ds.SendActivation: _send, ds.LoadMicroBatch: _send}

    def run(self, instruction):
        return self._INSTRUCTION_MAP[type(instruction)](self, **instruction.kwargs)


def test_every_handler_is_timed_under_its_kind() -> None:
    engine = _Engine()
    clock = install_step_clock(engine)
    assert _Engine._INSTRUCTION_MAP[ds.ForwardPass] is _Engine._forward  # the class keeps its own map
    assert engine.run(ds.ForwardPass(buffer_id=3)) == ("F", 3)
    assert engine.run(ds.SendActivation(buffer_id=1)) == ("SEND", 1)
    engine.run(ds.LoadMicroBatch(buffer_id=0))
    seconds = clock.take()
    assert set(seconds) == set(CATEGORIES)
    # Each sleep lies inside its handler, so its kind holds at least that long (sleep never returns early).
    assert seconds["pass"] >= 0.02 and seconds["p2p"] >= 0.001
    assert seconds["other_instr"] >= 0.001  # LoadMicroBatch: timed, under no named kind
    assert seconds["collective"] == seconds["optimizer"] == 0.0
    assert clock.take()["pass"] == 0.0  # take() starts the next step from zero
