"""VocabPipelineEngine: DeepSpeed's PipelineEngine running a vptrain schedule with one transformer
chunk per rank and the loss on the last stage: 1F1B with the vocabulary-parallel methods, and ZB-H1
with every method (the plain one too: embedding on stage 0, output layer and DeepSpeed's loss_fn
on the last stage). On a split schedule B computes the input gradient only and W the weight
gradients (engine/split_backward.py)."""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from vptrain.engine.lowering import LoweredSchedule, WeightPass
from vptrain.engine.split_backward import run_input_backward, run_weight_pass
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
        plain = self.plan.algo is None
        if self.is_first_stage():
            self.pipe_buffers["inputs"][buffer_id] = (
                self.batch[buffer_id][0] if plain else self._embedding_input(buffer_id)
            )
        loss_stage = self.is_last_stage()
        if plain and loss_stage:
            self.pipe_buffers["labels"][buffer_id] = self.batch[buffer_id][1]
        self._as_middle = loss_stage and not plain
        try:
            self._timed(PipelineEngine._exec_forward_pass, self, buffer_id)
        finally:
            self._as_middle = False
        if plain and loss_stage:
            # DeepSpeed keeps one `loss`; the schedule may run another F before this microbatch's B.
            self._put("loss", buffer_id, self.loss)
            self.pipe_buffers["labels"][buffer_id] = None

    def _exec_backward_pass(self, buffer_id):
        self._record(f"B{buffer_id}")
        plain = self.plan.algo is None
        loss_stage = self.is_last_stage()
        if plain and loss_stage:
            loss, grad = self._take("loss", buffer_id), None
        else:
            loss = None
            grad = self._loss_stage_grad(buffer_id) if loss_stage else self._take("recv_grad", buffer_id)
            grad = grad.reshape(self.plan.act_shape).to(self.plan.act_dtype)
        inputs = self.pipe_buffers["inputs"][buffer_id]
        if self.plan.split_backward:
            self._timed(self._input_backward, buffer_id, grad, loss)
        else:
            self._whole_backward(buffer_id, grad, loss)
        if self.is_first_stage() and not plain:
            self._put("demb", buffer_id, inputs.grad)
            self.pipe_buffers["inputs"][buffer_id] = None

    def _whole_backward(self, buffer_id, grad, loss) -> None:
        """DeepSpeed's own backward: the loss's on the plain loss stage, the chunk output's elsewhere."""
        if loss is not None:
            self.loss = loss
        else:
            self.grad_layer = grad
        # Under a vocabulary method this also keeps DeepSpeed from scaling the (pre-scaled) gradient by 1/GAS.
        self._as_middle = loss is None
        try:
            self._timed(PipelineEngine._exec_backward_pass, self, buffer_id)
        finally:
            self._as_middle = False

    def _input_backward(self, buffer_id, grad, loss) -> None:
        run_input_backward(self, buffer_id, grad=grad, loss=loss)
        self.pipe_buffers["output_tensors"][buffer_id] = None  # as DeepSpeed's own backward

    def _exec_weight_pass(self, buffer_id):
        self._record(f"W{buffer_id}")
        run_weight_pass(self, buffer_id)

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
        WeightPass: _exec_weight_pass,
        ds.SendActivation: _exec_send_activations,
        ds.RecvActivation: _exec_recv_activations,
        ds.SendGrad: _exec_send_grads,
        ds.RecvGrad: _exec_recv_grads,
        **vocab_handlers(),
    }
