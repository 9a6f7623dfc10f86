"""The GEMMs of the vocabulary layers: operands in the weight's dtype, fp32 accumulation and result.

Logits, softmax and every gradient are fp32 whatever the weight's dtype. Where the device's GEMM
writes fp32 from bf16/fp16 operands (torch.mm / torch.addmm with `out_dtype`, CUDA in recent
torch), it writes straight into the fp32 destination: no low-precision result, no fp32 copy of it,
and logits that are not rounded to bf16. Such a GEMM takes operands of one dtype, so an fp32
operand (the softmax, D) is cast to the weight's dtype first (`operand`). Where it does not exist
(torch's CPU build), the GEMM runs in fp32 on fp32 copies of the low-precision operand, taken
BLOCK_ELEMENTS at a time so the copies stay small, and fp32 operands are used as they are: same
fp32 accumulation, no bf16 rounding of the result either.
"""

from __future__ import annotations

import functools

import torch

FP32 = torch.float32
BLOCK_ELEMENTS = 1 << 22
"""Most elements of a low-precision operand upcast at once on the fallback path (16 MiB in fp32)."""


@functools.cache
def fp32_out_support(device_type: str) -> tuple[bool, bool]:
    """(mm, addmm into an fp32 accumulator) accept bf16 operands with out_dtype=fp32 on this device type.

    A fact about the installed torch build, probed once per device type with 2x2 tensors; torch
    before 2.8 has no out_dtype at all, and some versions have mm's but not addmm's fp32 accumulator.
    """
    device = torch.device(device_type)
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.zeros(2, 2, dtype=FP32, device=device)
    try:
        torch.mm(a, a, out_dtype=FP32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False, False
    try:
        torch.addmm(acc, a, a, out_dtype=FP32, out=acc)
    except (RuntimeError, NotImplementedError, TypeError):
        return True, False
    return True, True


def _direct(t: torch.Tensor) -> bool:
    return fp32_out_support(t.device.type)[0]


def operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 operand as the GEMM beside a `dtype` operand consumes it: cast to dtype where the
    device's fp32-output GEMM needs equal operand dtypes, unchanged otherwise. Cast once, use twice."""
    if dtype == FP32 or not _direct(t):
        return t
    return t.to(dtype)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 a @ b computed in b's dtype (written into out, fp32, when given)."""
    if b.dtype == FP32:
        a = a.to(FP32)
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if _direct(b):
        a = a.to(b.dtype)
        return torch.mm(a, b, out_dtype=FP32) if out is None else torch.mm(a, b, out_dtype=FP32, out=out)
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=FP32, device=b.device)
    return _blocked(out, a, b, accumulate=False)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc fp32, computed in b's dtype."""
    if b.dtype == FP32:
        acc.addmm_(a.to(FP32), b)
        return
    direct_mm, direct_addmm = fp32_out_support(b.device.type)
    if direct_addmm:
        torch.addmm(acc, a.to(b.dtype), b, out_dtype=FP32, out=acc)
    elif direct_mm:
        acc.add_(torch.mm(a.to(b.dtype), b, out_dtype=FP32))  # one fp32 temporary of acc's size
    else:
        _blocked(acc, a, b, accumulate=True)


def _blocked(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """out (+)= a @ b in fp32, b upcast a block of its rows (the reduction dimension) at a time."""
    a = a.to(FP32)
    k = b.shape[0]
    if k == 0 and not accumulate:
        return out.zero_()
    step = max(1, BLOCK_ELEMENTS // max(b.shape[1], 1))
    for lo in range(0, k, step):
        hi = min(lo + step, k)
        part = b[lo:hi].to(FP32)
        if lo == 0 and not accumulate:
            torch.mm(a[:, lo:hi], part, out=out)
        else:
            out.addmm_(a[:, lo:hi], part)
    return out
