"""The global gradient norm, accumulated in fp64 on the device, and the clip that uses it.

Why fp64: the norm decides the clip coefficient, which scales every gradient of the step. Summed
in fp32, the squares of a sharded 3.2M-row table come out ~1e-4 apart (relative) depending on how
the rows are split and in which order the partial sums meet; an equivalence test then depends on
the machine's rounding. In fp64 the order no longer matters at fp32 resolution: the square of an
fp32 number is exact in fp64, and 2^-53 per addition is far below anything a test compares.

Why here: DeepSpeed computes the norm in three places, each in fp32 at some stage: `clip_grad_norm_`
(fp32 engines), `BF16_Optimizer.step` (bf16) and ZeRO's `scaled_global_norm` (fp64 per tensor, then
fp32 across ranks). `route_clipping_through_fp64` sends all three through `global_norm`, over the
same gradients DeepSpeed would use: every parameter lives on exactly one pipeline stage of a
replica, so the squares are summed over the pipeline ranks (DeepSpeed's model-parallel group); the
data-parallel replicas hold identical reduced gradients, so they are not summed again, except
under ZeRO, where each data-parallel rank holds a partition.

Nothing here reads a value on the host: the coefficient stays a device tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 22  # an fp64 temporary of at most 32 MiB per reduction, however large the table
CLIP_EPS = 1e-6  # torch's and DeepSpeed's: coefficient = max_norm / (norm + 1e-6)


def squared_norm_fp64(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squares of every element of `tensors`, accumulated in fp64 (a 0-d tensor on device)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for tensor in tensors:
        for chunk in tensor.detach().reshape(-1).split(CHUNK_ELEMENTS):
            total += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
    return total


def global_norm(tensors: Iterable[torch.Tensor], *, groups: Sequence, device: torch.device) -> torch.Tensor:
    """The L2 norm of `tensors` of every rank of `groups` (summed over each group in turn), in fp64.

    `groups` entries are process groups (None: the default group); a group of one rank is skipped.
    """
    total = squared_norm_fp64(tensors, device)
    for group in groups:
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_by_norm_(tensors: Iterable[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `tensors` in place by min(1, max_norm / (norm + 1e-6)), torch's and DeepSpeed's coefficient.

    A non-finite norm leaves the tensors as they are, so the optimizer's own overflow check still
    sees the non-finite gradient and skips the step (a zero coefficient would hide it).
    """
    if max_norm <= 0:
        return
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
    for tensor in tensors:
        tensor.detach().mul_(coef.to(tensor.dtype))


def clip_grad_norm_fp64(parameters: Iterable[torch.nn.Parameter], max_norm: float, *, groups: Sequence = (),
                        device: torch.device | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm accumulated in fp64 (and summed over `groups`)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    norm = global_norm(grads, groups=groups, device=device)
    clip_by_norm_(grads, norm, max_norm)
    return norm


# ---- DeepSpeed's three clipping paths ----------------------------------------------------------------
def clip_fp32_engine(engine) -> torch.Tensor:
    """The fp32 engines' clip (DeepSpeed calls `clip_fp32_gradients` when gradient_clipping > 0)."""
    return clip_grad_norm_fp64(engine.module.parameters(), engine.gradient_clipping(),
                               groups=[engine.mpu.get_model_parallel_group()], device=engine.device)


def route_clipping_through_fp64(engine) -> None:
    """Make the bf16 and ZeRO optimizers DeepSpeed built for `engine` use `global_norm`.

    fp32 engines need nothing here: their `clip_fp32_gradients` calls `clip_fp32_engine`.
    """
    if engine.zero_optimization():
        _zero_norm_in_fp64(engine.optimizer, engine.mpu, engine.device)
    elif engine.bfloat16_enabled():
        _bf16_clip_in_fp64(engine.optimizer, engine.mpu, engine.device)


def _bf16_clip_in_fp64(optimizer, mpu, device: torch.device) -> None:
    """BF16_Optimizer.step computes an fp32 norm and clips with it. Its fp32 gradients are clipped
    here first, with the fp64 norm; its own clip is switched off (it would clip a second time by
    ~1e-6), and its own norm then only serves its overflow check."""
    max_norm = float(optimizer.clip_grad)
    optimizer.clip_grad = 0.0
    inner_step = optimizer.step

    def step(closure=None):
        grads, expert_grads = optimizer.get_grads_for_norm()
        if expert_grads:
            raise NotImplementedError("vptrain's fp64 gradient norm does not cover MoE parameters")
        norm = global_norm(grads, groups=[mpu.get_model_parallel_group()], device=device)
        clip_by_norm_(optimizer.get_grads_for_norm(for_clipping=True), norm, max_norm)
        inner_step(closure)
        optimizer._global_grad_norm = norm  # the engine copies it from here after the step

    optimizer.step = step


def _zero_norm_in_fp64(optimizer, mpu, device: torch.device) -> None:
    """ZeRO-1/2 clip with `scaled_global_norm()`: each data-parallel rank holds a partition of the
    gradients (`averaged_gradients`), so the squares are summed over the data-parallel group, then
    over the pipeline. The same tensors as DeepSpeed's `get_grad_norm_direct`: padding and
    pipeline-replicated parameters excluded."""
    if optimizer.cpu_offload or optimizer.has_moe_layers:
        raise NotImplementedError("vptrain's fp64 gradient norm covers ZeRO without offload or MoE")

    def scaled_global_norm(norm_type=2):
        assert norm_type == 2, "only the L2 norm is used for clipping"
        grads = []
        for i in range(len(optimizer.bit16_groups)):
            partition = [g for g in optimizer.averaged_gradients[i] if not getattr(g, "_zero_padding", False)]
            for grad, param in zip(partition, optimizer.params_in_partition[i], strict=False):  # as DeepSpeed
                if not getattr(param, "ds_pipe_replicated", False):
                    grads.append(grad)
        norm = global_norm(grads, groups=[optimizer.dp_process_group, mpu.get_model_parallel_group()], device=device)
        return norm * optimizer.loss_scale  # "scaled": DeepSpeed divides by the loss scale (1 without fp16)

    optimizer.scaled_global_norm = scaled_global_norm
