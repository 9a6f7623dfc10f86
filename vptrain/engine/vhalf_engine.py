"""V-Half on DeepSpeed's DualPipeV engine: two chunks per rank in a V (rank r holds stages r and
2p-1-r), so rank 0 holds both the first and the last stage. Runs the plain method (embedding and
output layer on rank 0) and the vocabulary-parallel ones (their loss rank is rank 0, chunk 1).
V-Half splits the backward: B computes the input gradient only, W the weight gradients
(engine/split_backward.py); an unsplit schedule would run DeepSpeed's own backward."""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine, DualPipeVModule

from vptrain.engine.lowering import LoweredSchedule, WeightPass
from vptrain.engine.split_backward import run_input_backward, run_weight_pass
from vptrain.engine.strict_order import OrderCheckHook
from vptrain.engine.vocab_passes import VocabPassesMixin, vocab_handlers


class StagedDualPipeVModule(DualPipeVModule):
    """DualPipeVModule with explicit boundaries for its 2p stages."""

    def __init__(self, layers, *, parts: list[int], **kwargs):
        self._explicit_parts = parts
        super().__init__(layers=layers, partition_method="uniform", **kwargs)

    def _partition_layers(self, method="uniform"):
        self.num_stages *= 2
        stage = self._topo.get_coord(self.global_rank).pipe
        self.parts = list(self._explicit_parts)
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        mirror = self.num_stages - 1 - stage
        self.phase_bounds = [(self._local_start, self._local_stop), (self.parts[mirror], self.parts[mirror + 1])]


class VHalfEngine(OrderCheckHook, VocabPassesMixin, DualPipeVEngine):
    def __init__(self, *args, plan, busy_timer, **kwargs):
        self._init_vocab_state(plan, busy_timer)
        super().__init__(*args, **kwargs)

    def _train_schedule(self):
        return LoweredSchedule(self.plan.actions, micro_batches=self.micro_batches, stages=self.num_stages,
                               stage_id=self.stage_id, chunks=2)

    def _split(self, buffer_id: int, phase: int) -> tuple[int, str]:
        mb = buffer_id - phase * self.micro_batches
        return mb, f"{mb}.{phase}" if phase else f"{mb}"

    def _exec_forward_pass(self, buffer_id, phase):
        mb, name = self._split(buffer_id, phase)
        self._record(f"F{name}")
        vocab_method = self.plan.algo is not None
        if self.stage_id == 0 and phase == 0:
            self.pipe_buffers["inputs"][buffer_id] = (
                self._embedding_input(mb) if vocab_method else self.batch[mb][0]
            )
        if self._is_loss_stage(phase) and not vocab_method:
            self.pipe_buffers["labels"][buffer_id] = self.batch[mb][1]
        self._as_middle = vocab_method and self._is_loss_stage(phase)
        try:
            self._timed(DualPipeVEngine._exec_forward_pass, self, buffer_id, phase)
        finally:
            self._as_middle = False

    def _exec_backward_pass(self, buffer_id, phase):
        mb, name = self._split(buffer_id, phase)
        self._record(f"B{name}")
        vocab_method = self.plan.algo is not None
        inputs = self.pipe_buffers["inputs"][buffer_id]  # DualPipeV frees stage 0's inputs in backward
        if self.plan.split_backward:
            self._timed(self._input_backward, buffer_id, phase, mb)
        else:
            if vocab_method and self._is_loss_stage(phase):
                self.grad_layer = self._loss_stage_grad(mb).reshape(self.plan.act_shape).to(self.plan.act_dtype)
                self._as_middle = True  # the gradient is pre-scaled: no loss backward, no 1/GAS hook
            try:
                self._timed(DualPipeVEngine._exec_backward_pass, self, buffer_id, phase)
            finally:
                self._as_middle = False
        if vocab_method and self.stage_id == 0 and phase == 0:
            self._put("demb", mb, inputs.grad)

    def _input_backward(self, buffer_id, phase, mb) -> None:
        """B, with DualPipeV's bookkeeping: where the chunk output's gradient comes from (the loss, the
        vocabulary passes, the turn-around on the last rank, a received one) and what is freed after."""
        loss, grad = None, None
        if self._is_loss_stage(phase):
            if self.plan.algo is not None:
                grad = self._loss_stage_grad(mb).reshape(self.plan.act_shape).to(self.plan.act_dtype)
            else:
                loss = self.pipe_buffers["losses"][buffer_id]
                self.pipe_buffers["losses"][buffer_id] = None
        elif self._is_last_rank() and phase == 0:
            turn = self._phase1_buffer(buffer_id)
            held = self.pipe_buffers["inputs"][turn]  # the phase-1 input: its B set .grad
            grad = [t.grad for t in (held if isinstance(held, tuple) else (held,)) if t.is_floating_point()]
            self.pipe_buffers["inputs"][turn] = None
        else:
            grad = self.pipe_buffers["grads"][buffer_id]
            self.pipe_buffers["grads"][buffer_id] = None
        run_input_backward(self, buffer_id, grad=grad, loss=loss)
        if self.stage_id == 0 and phase == 0:
            self.pipe_buffers["inputs"][buffer_id] = None  # the first stage sends no gradient to free it
        if self._is_loss_stage(phase):
            self.pipe_buffers["labels"][buffer_id] = None

    def _exec_weight_pass(self, buffer_id, phase):
        self._record(f"W{self._split(buffer_id, phase)[1]}")
        run_weight_pass(self, buffer_id)

    def _comm(self, name: str, handler, buffer_id, phase):
        mb, label = self._split(buffer_id, phase)
        self._record(f"{name}{label}")
        handler(self, buffer_id, phase)

    def _exec_send_activations(self, buffer_id, phase):
        self._comm("SEND_F", DualPipeVEngine._exec_send_activations, buffer_id, phase)

    def _exec_recv_activations(self, buffer_id, phase):
        self._comm("RECV_F", DualPipeVEngine._exec_recv_activations, buffer_id, phase)

    def _exec_send_grads(self, buffer_id, phase):
        self._comm("SEND_B", DualPipeVEngine._exec_send_grads, buffer_id, phase)

    def _exec_recv_grads(self, buffer_id, phase):
        self._comm("RECV_B", DualPipeVEngine._exec_recv_grads, buffer_id, phase)

    _INSTRUCTION_MAP = {
        **DualPipeVEngine._INSTRUCTION_MAP,
        ds.ForwardPass: _exec_forward_pass,
        ds.BackwardPass: _exec_backward_pass,
        WeightPass: _exec_weight_pass,
        ds.SendActivation: _exec_send_activations,
        ds.RecvActivation: _exec_recv_activations,
        ds.SendGrad: _exec_send_grads,
        ds.RecvGrad: _exec_recv_grads,
        **vocab_handlers(),
    }
