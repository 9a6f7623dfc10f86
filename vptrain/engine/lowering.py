"""Lowering a validated vptrain schedule to DeepSpeed pipeline instructions.

One rank's action list becomes one instruction per step, in the same order: the engine executes
exactly what the validator and simulator checked. Transformer passes and p2p reuse DeepSpeed's
instruction classes (buffer id = microbatch); the vocabulary passes and collectives get their own.
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds

from vptrain.schedule.ir import Action, PassKind


class VocabInstruction(ds.PipeInstruction):
    """A vocabulary pass or collective of one microbatch."""

    def __init__(self, microbatch: int, **kwargs):
        super().__init__(microbatch=microbatch, **kwargs)


class InputForward(VocabInstruction):
    """IF: this rank's rows of the input embedding for a microbatch's tokens."""


class InputBackward(VocabInstruction):
    """IB: scatter-add the embedding-output gradient into this rank's rows."""


class OutputForward(VocabInstruction):
    """S: shard logits and local softmax statistics (Alg 2 also the local-softmax x W product)."""


class OutputBackward(VocabInstruction):
    """T: the shard's weight gradient (and the partial input gradient for naive / Alg 1)."""


class VocabCollective(VocabInstruction):
    """Issue one vocabulary collective (kind: a collective PassKind name) without blocking."""

    def __init__(self, microbatch: int, kind: str):
        super().__init__(microbatch=microbatch, kind=kind)


class WeightPass(ds.BufferOpInstruction):
    """W: the weight gradients of a (microbatch, chunk) whose B ran (split schedules: zb-h1, vhalf)."""


_COMPUTE = {
    PassKind.IF: InputForward,
    PassKind.IB: InputBackward,
    PassKind.S: OutputForward,
    PassKind.T: OutputBackward,
}
_TRANSFORMER = {
    PassKind.F: ds.ForwardPass,
    PassKind.B: ds.BackwardPass,  # on a split schedule the engine's B computes the input gradient only
    PassKind.W: WeightPass,
    PassKind.SEND_F: ds.SendActivation,
    PassKind.RECV_F: ds.RecvActivation,
    PassKind.SEND_B: ds.SendGrad,
    PassKind.RECV_B: ds.RecvGrad,
}


def lower_action(action: Action, *, num_microbatches: int, chunks: int) -> list[ds.PipeInstruction]:
    """One action as DeepSpeed instructions. With several chunks per rank (V-Half, interleaved: the
    DualPipeV engine's phases) transformer instructions carry the chunk as `phase`, chunk c uses
    buffer slots c*m..(c+1)*m-1, and every transfer is committed at once so it keeps the schedule's
    rendezvous semantics."""
    kind = action.kind
    if kind in _TRANSFORMER:
        if chunks == 1:
            if action.chunk != 0:
                raise ValueError(f"{action}: the 1F1B engine runs one chunk per rank")
            return [_TRANSFORMER[kind](buffer_id=action.microbatch)]
        buffer_id = action.microbatch + action.chunk * num_microbatches
        cmd = _TRANSFORMER[kind](buffer_id=buffer_id, phase=action.chunk)
        return [cmd, ds.CommitP2P()] if kind.is_p2p else [cmd]
    if kind in _COMPUTE:
        return [_COMPUTE[kind](action.microbatch)]
    if kind.is_collective:
        return [VocabCollective(action.microbatch, kind.value)]
    raise ValueError(f"{action}: no DeepSpeed lowering for {kind.value}")


class LoweredSchedule(ds.PipeSchedule):
    """A DeepSpeed PipeSchedule that yields one rank's lowered actions, then the optimizer tail."""

    def __init__(self, actions: tuple[Action, ...], *, micro_batches: int, stages: int, stage_id: int,
                 chunks: int = 1):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        self.actions = actions
        self.chunks = chunks
        self.instructions = [lower_action(a, num_microbatches=micro_batches, chunks=chunks)
                             for a in actions]

    def steps(self):
        yield from self.instructions
        yield [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        # One slot per (microbatch, chunk): they hold references only, freed by their consumer.
        return self.micro_batches * self.chunks
