"""The reference trainer: the whole GPT in one process, plain PyTorch, no pipeline (layout.pp=1).

Every distributed layout is checked against this. With layout.dp > 1 each replica runs the same
model on its slice of the batch and gradients are averaged with one all-reduce per tensor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from vptrain.config import RunConfig
from vptrain.engine.common import (
    BusyTimer,
    Microbatch,
    StepResult,
    gpt_shape,
    optimizer_state_bytes,
    tensor_bytes,
)
from vptrain.model import GPT, lm_loss
from vptrain.optim import build_optimizer, build_scheduler


class SingleProcessTrainer:
    def __init__(self, cfg: RunConfig, *, device: torch.device, dp_rank: int = 0):
        self.cfg, self.device = cfg, device
        self.stage, self.num_stages, self.dp_rank = 0, 1, dp_rank
        self.model = GPT(gpt_shape(cfg)).to(device)
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
        total = 0.0
        token = self.timer.start()
        for tokens, labels in micro:
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            with self._autocast():
                loss = lm_loss(self.model(tokens), labels)
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        self.timer.stop(token)
        params = [p for p in self.model.parameters() if p.grad is not None]
        dp = self.cfg.layout.dp
        if dp > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dp
            loss_t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(loss_t)
            total = loss_t.item() / dp
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return StepResult(loss=total, grad_norm=float(norm))

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def memory_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": optimizer_state_bytes(self.optimizer),
        }

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def named_parameters_global(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters()}

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
