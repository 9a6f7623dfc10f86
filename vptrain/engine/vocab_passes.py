"""The vocabulary passes and collectives, shared by the 1F1B and the V-Half engines.

The engines make no scheduling decisions: they execute the lowered actions of their rank in order.
Per-microbatch state (hidden-state broadcasts, output-layer states, collective handles, received
gradients) lives in a dict on the engine keyed by (what, microbatch) and is freed by its consumer.
A reduce this rank only contributes to (∇X, ∇X̂ off the loss rank, the embedding off the embedding
rank) has no consumer here: it is completed and freed at its release point, the first action after
which the schedule proves every rank issued it (vptrain/schedule/memory.py), so nothing a pass does
not need outlives it until the optimizer step (DESIGN.md invariant 7).

Collectives run on the vocabulary process group (the pp ranks of one pipeline), never on the
group of the p2p transfers, and are issued asynchronously; a pass that needs a result waits for it.
The loss rank turns the statistics into the loss and the per-token gradient g once and broadcasts
g; no rank recomputes it.
"""

from __future__ import annotations

import torch

from vptrain import vocab
from vptrain.engine import shard_grads
from vptrain.engine.common import batch_to_device
from vptrain.schedule import PassKind

# State keys of the reduces a rank only sends to (see the module docstring).
SENT = {PassKind.EMB_REDUCE: "emb_sent", PassKind.DX_REDUCE: "dx_sent", PassKind.DXHAT: "dxhat_sent"}


class VocabPassesMixin:
    """Mixed into a DeepSpeed PipelineEngine subclass that defines `plan` and `busy_timer`."""

    discard_step = False  # an eval batch: the optimizer step drops the gradients (pipeline.discarding_step)

    def _init_vocab_state(self, plan, busy_timer) -> None:
        self._as_middle = False
        self.plan = plan
        self.busy_timer = busy_timer
        self.batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.executed: list[str] = []
        self.state: dict[tuple[str, int], object] = {}
        # Called with the engine between actions (after the previous one's releases): tests measure
        # what the state holds through it.
        self.memory_probe = None

    def is_last_stage(self):
        # The loss chunk's F/B run like a middle stage's when the loss comes from the vocabulary passes.
        return False if self._as_middle else super().is_last_stage()

    def run_step(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        self.batch = batch_to_device(batch, self.device)
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
        self._release_after(len(self.executed) - 1)
        if self.memory_probe is not None:
            self.memory_probe(self)
        self.executed.append(action)

    def _release_after(self, position: int) -> None:
        """Complete and drop the reduces the schedule releases after this rank's action `position`:
        every rank has issued them by then, so the wait blocks on no peer (and stalls no GPU stream)."""
        for action in self.plan.releases.get(position, ()):
            self._wait(SENT[action.kind], action.microbatch)

    def _timed(self, fn, *args):
        token = self.busy_timer.start()
        try:
            return fn(*args)
        finally:
            self.busy_timer.stop(token)

    def _is_loss_rank(self) -> bool:
        return self.stage_id == self.plan.loss_stage

    def _accumulate(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """Add a vocabulary shard's fp32 weight gradient: under BF16_Optimizer straight into its
        gradient buffer (no walk over the stage's parameters, no bf16 .grad on the way), otherwise
        through autograd so ZeRO-1's hooks see it (engine/shard_grads.py)."""
        if not self.using_bf16_optimizer:
            shard_grads.accumulate_through_autograd(self, param, grad)
            return
        slots = getattr(self, "_bf16_grad_slots", None)
        if slots is None:  # the optimizer exists only once DeepSpeed's __init__ has run
            slots = self._bf16_grad_slots = shard_grads.Bf16GradSlots(self.optimizer)
        slots.add(param, grad)

    # ---- vocabulary passes --------------------------------------------------------------------
    def _loss_stage_grad(self, mb: int) -> torch.Tensor:
        """∂loss/∂(final hidden state) of microbatch mb on the loss rank, already scaled by 1/m."""
        if self.plan.algo == "alg2":
            grad_x_hat = self._wait("dxhat", mb)  # g was made by DXHAT's issue, if not by G_BCAST's
            return vocab.apply_token_grad(grad_x_hat, self._loss_grad(mb))
        return self._wait("dx", mb)

    def _loss_grad(self, mb: int, state=None) -> torch.Tensor:
        """The loss rank's g of mb for one of its users, G_BCAST and (alg2) the loss stage's B:
        made once (_loss_and_grad), dropped from the state by the last of them."""
        g = self._loss_and_grad(mb, state)
        left = self.state.pop(("g_users", mb), 2 if self.plan.algo == "alg2" else 1) - 1
        if left:
            self.state[("g_users", mb)] = left
        else:
            self.state.pop(("g_local", mb))
        return g

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
        # The kept-token count stays on the device: int() of it would wait for the device's queue.
        kept = (labels != vocab.IGNORE_INDEX).sum().clamp_min(1)
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
        state = self.state[("out", mb)]
        self._put("stats", mb, (vocab.stats_phase(state, self.plan.comm, async_op=True), None))
        if self.plan.algo == "alg2":  # DXHAT needs the state too, and the schedule may run T (its consumer) first
            self._put("dxhat_state", mb, state)

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
        state = self._take("dxhat_state", mb)
        loss_rank = self._is_loss_rank()
        if loss_rank:  # B needs g beside ∇X̂ and may come after T has dropped the state: make g now
            self._loss_and_grad(mb, state)
        # Reduced onto the loss rank only; the pending holds just the sum (or, elsewhere, the send
        # buffer), not the state, which T frees.
        pending = vocab.grad_input_phase(state, self.plan.comm, async_op=True, dst=self.plan.loss_stage)
        self._put("dxhat" if loss_rank else SENT[PassKind.DXHAT], mb, (pending, pending.result))

    def _issue_g_bcast(self, mb: int) -> None:
        p = self.plan
        if self._is_loss_rank():
            self._ensure_stats(mb)
            g = self._loss_grad(mb, self.state[("out", mb)])  # a broadcast only reads its source: no copy
        else:
            # A receiver issues without waiting for anything (its T waits for the statistics).
            g = torch.empty(p.tokens, dtype=torch.float32, device=self.device)
        self._put("g", mb, (p.comm.broadcast(g, p.loss_stage, async_op=True), g))

    def _issue_dx_reduce(self, mb: int) -> None:
        grad_x = self._take("dx_partial", mb)
        pending = vocab.dx_phase(grad_x, self.plan.comm, async_op=True, dst=self.plan.loss_stage)
        self._put("dx" if self._is_loss_rank() else SENT[PassKind.DX_REDUCE], mb, (pending, grad_x))

    def _issue_emb_reduce(self, mb: int) -> None:
        partial = self._take("emb_partial", mb)
        pending = vocab.embed_reduce(partial, self.plan.comm, dst=self.plan.embed_stage, async_op=True)
        if self.stage_id == self.plan.embed_stage:
            self._put("emb", mb, (pending, partial))
        else:
            self._put(SENT[PassKind.EMB_REDUCE], mb, (pending, partial))  # the send buffer, until released

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
        if self.discard_step:
            from vptrain.engine.pipeline import discard_gradients

            discard_gradients(self)
            return
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    def _finish_collectives(self) -> None:
        # Only the reduces released after the rank's last action are left (nothing later in the
        # schedule proves them issued everywhere); anything else still held fails the step (run_step).
        self._release_after(len(self.executed) - 1)
        if self.memory_probe is not None:
            self.memory_probe(self)

    def clip_fp32_gradients(self):
        # The norm in fp64, summed over the pipeline (see engine/grad_norm.py); kept for logging.
        from vptrain.engine.grad_norm import clip_fp32_engine

        self._global_grad_norm = clip_fp32_engine(self)



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
