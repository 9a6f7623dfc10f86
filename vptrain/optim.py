"""Optimizer and learning-rate schedule, shared by every trainer so all layouts step identically."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from vptrain.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier on optim.lr before optimizer step `step` (0-based): linear warmup, then cosine
    decay to min_lr at the last step (or constant)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    floor = optim.min_lr / optim.lr
    span = max(1, total_steps - optim.warmup_steps - 1)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        foreach=False,  # the same kernels on every layout keep the equivalence tests bitwise-close
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))
