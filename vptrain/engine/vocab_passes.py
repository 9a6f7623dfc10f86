"""The vocabulary passes and collectives, shared by the 1F1B and the V-Half engines.

The engines make no scheduling decisions: they execute the lowered actions of their rank in order.
Per-microbatch state (hidden-state broadcasts, output-layer states, collective handles, received
gradients) lives in a dict on the engine keyed by (what, microbatch) and is freed by its consumer.

Collectives run on the vocabulary process group (the pp ranks of one pipeline), never on the
group of the p2p transfers, and are issued asynchronously; a pass that needs a result waits for it.
The loss rank turns the statistics into the loss and the per-token gradient g once and broadcasts
g; no rank recomputes it.
"""

from __future__ import annotations

import torch

from vptrain import vocab


class VocabPassesMixin:
    """Mixed into a DeepSpeed PipelineEngine subclass that defines `plan` and `busy_timer`."""

    def _init_vocab_state(self, plan, busy_timer) -> None:
        self._as_middle = False
        self.plan = plan
        self.busy_timer = busy_timer
        self.batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.executed: list[str] = []
        self.state: dict[tuple[str, int], object] = {}

    def is_last_stage(self):
        # The loss chunk's F/B run like a middle stage's when the loss comes from the vocabulary passes.
        return False if self._as_middle else super().is_last_stage()

    def run_step(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        self.batch = [(x.to(self.device), y.to(self.device)) for x, y in batch]
        self.executed = []
        loss = self.train_batch()
        leftover = sorted({k[0] for k in self.state})
        self.state.clear()
        if leftover:
            raise RuntimeError(f"schedule left per-microbatch state behind: {leftover}")
        return loss

    # ---- helpers ---------------------------------------------------------------------------
    def _put(self, what: str, mb: int, value) -> None:
        self.state[(what, mb)] = value

    def _take(self, what: str, mb: int):
        try:
            return self.state.pop((what, mb))
        except KeyError:
            raise RuntimeError(f"rank {self.global_rank}: {what} of microbatch {mb} is not available; "
                               f"the schedule ran its consumer before its producer") from None

    def _wait(self, what: str, mb: int):
        pending, result = self._take(what, mb)
        pending.wait()
        return result

    def _record(self, action: str) -> None:
        self.executed.append(action)

    def _timed(self, fn, *args):
        token = self.busy_timer.start()
        try:
            return fn(*args)
        finally:
            self.busy_timer.stop(token)

    def _is_loss_rank(self) -> bool:
        return self.stage_id == self.plan.loss_stage

    def _accumulate(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """Add a vocabulary weight gradient through autograd, inside the same bf16 bracket the
        engine puts around a non-last-stage backward (else the next clear_lp_grads drops it)."""
        if self.using_bf16_optimizer:
            self.optimizer.clear_lp_grads()
        self._running_engine_backward = True
        try:
            vocab.accumulate_grad(param, grad)
        finally:
            self._running_engine_backward = False
        if self.using_bf16_optimizer and not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    # ---- vocabulary passes --------------------------------------------------------------------
    def _loss_stage_grad(self, mb: int) -> torch.Tensor:
        """∂loss/∂(final hidden state) of microbatch mb on the loss rank, already scaled by 1/m."""
        if self.plan.algo == "alg2":
            state = self._wait("dxhat", mb)  # T may already have consumed ("out", mb)
            return vocab.apply_token_grad(state.grad_x_hat, self._loss_and_grad(mb, state))
        return self._wait("dx", mb)

    def _embedding_input(self, mb: int) -> torch.Tensor:
        """The summed token embeddings of mb on the embedding rank, as the first chunk's input leaf."""
        return self._wait("emb", mb).to(self.plan.act_dtype).requires_grad_()

    def _exec_input_forward(self, microbatch):
        self._record(f"IF{microbatch}")
        ids = self.batch[microbatch][0]
        partial = self._timed(vocab.input_forward, ids, self.module.vocab_input, self.plan.shard)
        self._put("emb_partial", microbatch, partial)

    def _exec_input_backward(self, microbatch):
        self._record(f"IB{microbatch}")
        grad_emb = self._wait("demb_bcast", microbatch)
        ids = self.batch[microbatch][0]
        token = self.busy_timer.start()
        grad_w = vocab.input_backward(ids, grad_emb, self.plan.shard)
        self._accumulate(self.module.vocab_input, grad_w)
        self.busy_timer.stop(token)

    def _exec_output_forward(self, microbatch):
        self._record(f"S{microbatch}")
        x = self._wait("x", microbatch)
        labels = self.batch[microbatch][1]
        p = self.plan
        state = self._timed(
            lambda: vocab.output_s_pass(x.reshape(-1, x.shape[-1]), self.module.vocab_output.detach(),
                                        labels.reshape(-1), p.shard, p.algo, chunk_tokens=p.chunk_tokens,
                                        store_softmax=p.store_softmax)
        )
        self._put("out", microbatch, state)

    def _exec_output_backward(self, microbatch):
        self._record(f"T{microbatch}")
        g = self._wait("g", microbatch)
        self._ensure_stats(microbatch)  # complete by now: the loss rank waited for it before sending g
        state = self._take("out", microbatch)
        token = self.busy_timer.start()
        grad_x, grad_w = vocab.output_t_pass(state, g)
        self._accumulate(self.module.vocab_output, grad_w)
        self.busy_timer.stop(token)
        if grad_x is not None:
            self._put("dx_partial", microbatch, grad_x)

    def _loss_and_grad(self, mb: int, state) -> torch.Tensor:
        """On the loss rank: the microbatch loss (added to DeepSpeed's total) and g, computed once."""
        if ("g_local", mb) in self.state:
            return self.state[("g_local", mb)]
        labels = self.batch[mb][1].reshape(-1)
        kept = max(1, int((labels != vocab.IGNORE_INDEX).sum()))
        loss = vocab.per_token_loss(state).sum() / kept
        g = vocab.token_grad(labels, normalizer=kept * self.micro_batches)
        self.total_loss = loss.detach().clone() if self.total_loss is None else self.total_loss + loss.detach()
        self.fwd_outputs.append(loss.detach())
        self.state[("g_local", mb)] = g
        return g

    def _exec_vocab_collective(self, microbatch, kind):
        self._record(f"{kind}{microbatch}")
        issue = getattr(self, f"_issue_{kind.lower()}")
        issue(microbatch)

    def _issue_x_bcast(self, mb: int) -> None:
        p = self.plan
        if self._is_loss_rank():
            x = self.pipe_buffers["outputs"][self.plan.buffer(mb, self.plan.loss_chunk)].detach().contiguous()
        else:
            x = torch.empty(p.act_shape, dtype=p.act_dtype, device=self.device)
        self._put("x", mb, (p.comm.broadcast(x, p.loss_stage, async_op=True), x))

    def _issue_stats(self, mb: int) -> None:
        self._put("stats", mb, (vocab.stats_phase(self.state[("out", mb)], self.plan.comm, async_op=True), None))

    def _issue_max(self, mb: int) -> None:
        pending = vocab.naive_max_phase(self.state[("out", mb)], self.plan.comm, async_op=True)
        self._put("max", mb, (pending, None))

    def _issue_sum(self, mb: int) -> None:
        self._wait("max", mb)
        pending = vocab.naive_sum_phase(self.state[("out", mb)], self.plan.comm, async_op=True)
        self._put("stats", mb, (pending, None))

    def _ensure_stats(self, mb: int) -> None:
        """Wait for the statistics of microbatch mb if this rank has not already."""
        if ("stats", mb) in self.state:
            self._wait("stats", mb)

    def _issue_dxhat(self, mb: int) -> None:
        self._ensure_stats(mb)
        state = self.state[("out", mb)]
        self._put("dxhat", mb, (vocab.grad_input_phase(state, self.plan.comm, async_op=True), state))

    def _issue_g_bcast(self, mb: int) -> None:
        p = self.plan
        if self._is_loss_rank():
            self._ensure_stats(mb)
            g = self._loss_and_grad(mb, self.state[("out", mb)]).clone()
        else:
            # A receiver issues without waiting for anything (its T waits for the statistics).
            g = torch.empty(p.tokens, dtype=torch.float32, device=self.device)
        self._put("g", mb, (p.comm.broadcast(g, p.loss_stage, async_op=True), g))

    def _issue_dx_reduce(self, mb: int) -> None:
        grad_x = self._take("dx_partial", mb)
        self._put("dx", mb, (vocab.dx_phase(grad_x, self.plan.comm, async_op=True), grad_x))

    def _issue_emb_reduce(self, mb: int) -> None:
        partial = self._take("emb_partial", mb)
        pending = vocab.embed_reduce(partial, self.plan.comm, dst=self.plan.embed_stage, async_op=True)
        if self.stage_id == self.plan.embed_stage:
            self._put("emb", mb, (pending, partial))
        else:
            self._put("emb_sent", mb, (pending, None))

    def _issue_demb_bcast(self, mb: int) -> None:
        p = self.plan
        if self.stage_id == p.embed_stage:
            grad = self._take("demb", mb).contiguous()
        else:
            grad = torch.empty(p.act_shape, dtype=p.act_dtype, device=self.device)
        self._put("demb_bcast", mb, (vocab.grad_broadcast(grad, p.comm, p.embed_stage, async_op=True), grad))

    def _exec_optimizer_step(self, lr_kwargs=None):
        from deepspeed.runtime.pipe.engine import PipelineEngine

        self._finish_collectives()
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    def _finish_collectives(self) -> None:
        # Collectives whose result this rank does not use (a reduce it only contributed to, the
        # all-reduced input gradient off the loss rank) must still complete before the weights change.
        for key in [k for k in self.state if k[0] in ("emb_sent", "stats", "dxhat", "dx", "g_local")]:
            value = self.state.pop(key)
            if key[0] != "g_local":
                value[0].wait()

    def clip_fp32_gradients(self):
        from deepspeed.runtime.utils import clip_grad_norm_

        self._global_grad_norm = clip_grad_norm_(
            parameters=self.module.parameters(), max_norm=self.gradient_clipping(), mpu=self.mpu
        )



def vocab_handlers() -> dict:
    """The vocabulary instructions' handlers (and the optimizer step that first completes the
    outstanding collectives), for an engine's _INSTRUCTION_MAP."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    from vptrain.engine.lowering import (
        InputBackward,
        InputForward,
        OutputBackward,
        OutputForward,
        VocabCollective,
    )

    return {
        InputForward: VocabPassesMixin._exec_input_forward,
        InputBackward: VocabPassesMixin._exec_input_backward,
        OutputForward: VocabPassesMixin._exec_output_forward,
        OutputBackward: VocabPassesMixin._exec_output_backward,
        VocabCollective: VocabPassesMixin._exec_vocab_collective,
        OptimizerStep: VocabPassesMixin._exec_optimizer_step,
    }
