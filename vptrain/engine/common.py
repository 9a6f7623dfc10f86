"""What every trainer offers the training loop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from vptrain.config import DEFAULT_ROPE_THETA, RunConfig, default_intermediate_size
from vptrain.model import GPTShape

Microbatch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None


def batch_to_device(micro: list[Microbatch], device: torch.device) -> list[Microbatch]:
    """A step's microbatches on the device, copied once per step. On a GPU the copies go from pinned
    memory with non_blocking=True: a copy from pageable memory makes the host wait for the device."""
    if device.type != "cuda":
        return [(tokens.to(device), labels.to(device)) for tokens, labels in micro]
    return [(tokens.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True))
            for tokens, labels in micro]


class Trainer(Protocol):
    stage: int
    num_stages: int
    dp_rank: int

    def train_step(self, micro: list[Microbatch]) -> StepResult: ...

    def current_lr(self) -> float: ...

    def memory_bytes(self) -> dict[str, int]: ...

    def named_parameters_global(self) -> dict[str, torch.Tensor]: ...

    def take_busy_seconds(self) -> float: ...


def gpt_shape(cfg: RunConfig, *, vocab_rows: int) -> GPTShape:
    """The model's shape; `vocab_rows` (the padded tables) comes from the resolved plan."""
    m = cfg.model
    return GPTShape(
        vocab_size=m.vocab_size,
        vocab_rows=vocab_rows,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_heads,
        seq_len=m.max_position_embeddings or m.seq_len,
        init_std=m.init_std,
        seed=cfg.train.seed,
        tie_embeddings=m.tie_embeddings,
        arch=m.arch,
        norm_eps=m.norm_eps,
        num_kv_heads=m.num_kv_heads or m.num_heads,
        intermediate_size=m.intermediate_size or default_intermediate_size(m.hidden_size),
        rope_theta=DEFAULT_ROPE_THETA if m.rope_theta is None else m.rope_theta,
        activation_checkpointing=m.activation_checkpointing,
    )


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gradient_bytes(params) -> int:
    """The gradients' bytes when they are all allocated: every trainable parameter holds one of its
    own size from its backward to the optimizer step. Read after a step, the engines have already
    released them (DeepSpeed sets them to None), which would report 0."""
    params = list(params)
    live = tensor_bytes(p.grad for p in params)
    return max(live, tensor_bytes(p for p in params if p.requires_grad))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        total += tensor_bytes(v for v in state.values() if torch.is_tensor(v))
    return total


class BusyTimer:
    """Accumulates time spent in compute passes. On GPU it records CUDA events and sums them when
    read, so timing adds no synchronisation to the pipeline."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple] = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((token, end))
        else:
            self.seconds += time.perf_counter() - token

    def take(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
            self.events.clear()
        out, self.seconds = self.seconds, 0.0
        return out
