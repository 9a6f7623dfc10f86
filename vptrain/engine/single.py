"""The reference trainer: the whole GPT in one process, plain PyTorch, no pipeline (layout.pp=1).

Every distributed layout is checked against this. With layout.dp > 1 each replica runs the same
model on its slice of the batch and gradients are averaged with one all-reduce per tensor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vptrain.config import RunConfig
from vptrain.engine.common import (
    BusyTimer,
    Microbatch,
    StepResult,
    batch_to_device,
    gpt_shape,
    gradient_bytes,
    optimizer_state_bytes,
    tensor_bytes,
)
from vptrain.engine.grad_norm import clip_grad_norm_fp64
from vptrain.engine.param_names import GlobalSlice, global_slices, named_parameters_global
from vptrain.init_from import apply_init_from
from vptrain.model import build_model, lm_loss
from vptrain.optim import build_optimizer, build_scheduler
from vptrain.resolved import ResolvedPlan, resolve_layout
from vptrain.vocab.shard import IGNORE_INDEX


class SingleProcessTrainer:
    def __init__(self, cfg: RunConfig, *, device: torch.device, dp_rank: int = 0, plan: ResolvedPlan | None = None):
        self.cfg, self.device = cfg, device
        self.stage, self.num_stages, self.dp_rank = 0, 1, dp_rank
        layout = plan.layout if plan is not None else resolve_layout(cfg)  # the whole model: no schedule needed
        self.vocab_rows = layout.vocab.rows
        self.model = build_model(gpt_shape(cfg, vocab_rows=layout.vocab.rows)).to(device)
        apply_init_from(cfg, self.model, self.global_slices())
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.timer = BusyTimer(device)
        self.bf16 = cfg.precision == "bf16"

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, micro: list[Microbatch]) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        micro = batch_to_device(micro, self.device)
        token = self.timer.start()
        total = self.forward_backward(micro)
        self.timer.stop(token)
        params = [p for p in self.model.parameters() if p.grad is not None]
        dp = self.cfg.layout.dp
        if dp > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dp
            dist.all_reduce(total)  # a device tensor: NCCL takes no CPU tensors
            total /= dp
        # The norm accumulates in fp64, as in the pipeline engines: equivalence must not depend on
        # the order in which fp32 sums of squares meet.
        norm = clip_grad_norm_fp64(params, self.cfg.train.grad_clip, device=self.device)
        self.optimizer.step()
        self.scheduler.step()
        return StepResult(loss=total.item(), grad_norm=norm.item())

    def forward_backward(self, micro: list[Microbatch]) -> torch.Tensor:
        """F and B of every microbatch (already on the device); the mean loss as a 0-dim fp64 device
        tensor. Nothing here reads a value on the host: an .item() per microbatch would make the host
        wait for the device's queue every time, so the loss is read once per step (fp64, as the
        Python floats it replaces)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for tokens, labels in micro:
            with self._autocast():
                loss = lm_loss(self.model(tokens), labels)
            (loss / len(micro)).backward()
            total += loss.detach().double() / len(micro)
        return total

    @torch.no_grad()
    def eval_step(self, micro: list[Microbatch]) -> float:
        """The batch's loss as train_step's (the mean of its microbatch means, averaged over
        data-parallel replicas), without a gradient; no state of the model, optimizer or schedule changes."""
        micro = batch_to_device(micro, self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for tokens, labels in micro:
            with self._autocast():
                logits = self.model(tokens)
            # The masked mean as the pipeline's loss takes it: a microbatch of padding (no target) is 0.
            kept = (labels != IGNORE_INDEX).sum().clamp_min(1)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / kept
            total += loss.double() / len(micro)
        if self.cfg.layout.dp > 1:
            dist.all_reduce(total)
            total /= self.cfg.layout.dp
        return total.item()

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def memory_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "params": tensor_bytes(params),
            "grads": gradient_bytes(params),
            "optimizer": optimizer_state_bytes(self.optimizer),
        }

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def global_slices(self) -> dict[str, GlobalSlice]:
        return global_slices(self.model, num_layers=self.cfg.model.num_layers, vocab_rows=self.vocab_rows)

    def named_parameters_global(self) -> dict[str, torch.Tensor]:
        return named_parameters_global(self.model, self.global_slices())

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def take_busy_seconds(self) -> float:
        return self.timer.take()
