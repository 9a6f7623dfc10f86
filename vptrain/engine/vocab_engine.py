"""VocabPipelineEngine: DeepSpeed's PipelineEngine running a vptrain 1F1B schedule with
vocabulary-parallel layers (one transformer chunk per rank; loss on the last stage)."""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from vptrain.engine.lowering import LoweredSchedule
from vptrain.engine.strict_order import OrderCheckHook
from vptrain.engine.vocab_passes import VocabPassesMixin, vocab_handlers


class VocabPipelineEngine(OrderCheckHook, VocabPassesMixin, PipelineEngine):
    def __init__(self, *args, plan, busy_timer, **kwargs):
        self._init_vocab_state(plan, busy_timer)
        super().__init__(*args, **kwargs)

    def _train_schedule(self):
        return LoweredSchedule(self.plan.actions, micro_batches=self.micro_batches, stages=self.num_stages,
                               stage_id=self.stage_id)

    def _exec_forward_pass(self, buffer_id):
        self._record(f"F{buffer_id}")
        if self.is_first_stage():
            self.pipe_buffers["inputs"][buffer_id] = self._embedding_input(buffer_id)
        self._as_middle = self.is_last_stage()
        try:
            self._timed(PipelineEngine._exec_forward_pass, self, buffer_id)
        finally:
            self._as_middle = False

    def _exec_backward_pass(self, buffer_id):
        self._record(f"B{buffer_id}")
        if self.is_last_stage():
            grad = self._loss_stage_grad(buffer_id)
        else:
            grad = self._take("recv_grad", buffer_id)
        self.grad_layer = grad.reshape(self.plan.act_shape).to(self.plan.act_dtype)
        self._as_middle = True  # also keeps DeepSpeed from scaling the (pre-scaled) gradient by 1/GAS
        try:
            self._timed(PipelineEngine._exec_backward_pass, self, buffer_id)
        finally:
            self._as_middle = False
        if self.is_first_stage():
            inputs = self.pipe_buffers["inputs"][buffer_id]
            self._put("demb", buffer_id, inputs.grad)
            self.pipe_buffers["inputs"][buffer_id] = None

    def _exec_send_activations(self, buffer_id):
        self._record(f"SEND_F{buffer_id}")
        PipelineEngine._exec_send_activations(self, buffer_id)

    def _exec_recv_activations(self, buffer_id):
        self._record(f"RECV_F{buffer_id}")
        PipelineEngine._exec_recv_activations(self, buffer_id)

    def _exec_send_grads(self, buffer_id):
        self._record(f"SEND_B{buffer_id}")
        PipelineEngine._exec_send_grads(self, buffer_id)

    def _exec_recv_grads(self, buffer_id):
        self._record(f"RECV_B{buffer_id}")
        PipelineEngine._exec_recv_grads(self, buffer_id)
        # DeepSpeed receives every gradient into one shared buffer; keep this microbatch's copy so
        # the schedule may receive another before running this backward.
        self._put("recv_grad", buffer_id, self.grad_layer.clone())

    # The map holds function objects: every overridden handler must be registered again.
    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds.ForwardPass: _exec_forward_pass,
        ds.BackwardPass: _exec_backward_pass,
        ds.SendActivation: _exec_send_activations,
        ds.RecvActivation: _exec_recv_activations,
        ds.SendGrad: _exec_send_grads,
        ds.RecvGrad: _exec_recv_grads,
        **vocab_handlers(),
    }
