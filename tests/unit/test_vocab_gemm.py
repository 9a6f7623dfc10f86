"""bf16 GEMMs of the vocabulary layers accumulate into fp32 (vptrain/vocab/gemm.py).

With bf16 operands the products are exact in fp32 (8-bit mantissas), so the only error of an fp32
accumulation is the summation's: |Z - Z64| <= k * eps32 * Σ_i |a_i b_i| for a k-term dot product
(the standard γ_k bound, k * u with u = eps32 / 2, doubled for safety against the blocked sums).
A bf16-rounded result adds up to eps_bf16 / 2 relative, about 2^16 times more, so it fails the bound.
"""

from __future__ import annotations

import pytest
import torch

from vptrain.vocab import IGNORE_INDEX, VocabShard, gemm, output_s_pass, output_t_pass, stats_phase, token_grad
from vptrain.vocab.inprocess import ThreadGroup

EPS32 = torch.finfo(torch.float32).eps


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k * eps32 * (|a| @ |b|) in fp64: the fp32 accumulation bound of every entry of a @ b."""
    return a.shape[1] * EPS32 * (a.double().abs() @ b.double().abs())


def test_bf16_logits_are_fp32_accumulated_not_bf16_rounded() -> None:
    """S's logits (naive keeps them raw in its buffer) against fp64 logits of the bf16 inputs."""
    n, h, vocab = 24, 64, 40
    x, weight = _bf16(n, h, seed=0), _bf16(vocab, h, seed=1)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(2))
    state = output_s_pass(x, weight, labels, VocabShard.of(vocab, 1, 0), "naive")
    exact = x.double() @ weight.double().t()
    bound = _bound(x, weight.t())
    assert state.buffer is not None and state.buffer.dtype == torch.float32
    assert ((state.buffer.double() - exact).abs() <= bound).all()
    rounded = (x @ weight.t()).double()  # the bf16 GEMM's bf16 result, as before
    assert ((rounded - exact).abs() > bound).any(), "the bound would not tell bf16-rounded logits apart"


@pytest.mark.parametrize("block", [gemm.BLOCK_ELEMENTS, 7], ids=["one_block", "blocks_of_7"])
def test_mm_and_addmm_accumulate_in_fp32(monkeypatch, block: int) -> None:
    """Every GEMM shape the layers use, on whichever path this device takes (CPU: blocked upcast)."""
    monkeypatch.setattr(gemm, "BLOCK_ELEMENTS", block)
    a, b = _bf16(9, 13, seed=3), _bf16(13, 11, seed=4)
    out = torch.full((9, 11), float("nan"))
    gemm.mm(a, b, out=out)
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs() <= _bound(a, b)).all()
    d = torch.randn(13, 9, generator=torch.Generator().manual_seed(5))  # an fp32 operand (D, the softmax)
    c = _bf16(9, 11, seed=6)
    d_op = gemm.operand(d, torch.bfloat16)  # rounded to bf16 only where the device's GEMM needs it
    acc = torch.ones(13, 11)
    gemm.addmm_(acc, d_op, c)
    expected = 1.0 + d_op.double() @ c.double()
    # fp32 x bf16 products round once each: the same k * eps32 bound, plus the add into acc.
    assert ((acc.double() - expected).abs() <= _bound(d_op, c) + EPS32 * expected.abs()).all()


def test_fp32_weights_take_the_plain_gemm() -> None:
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    torch.testing.assert_close(gemm.mm(a, b), torch.mm(a, b), rtol=0, atol=0)
    acc = torch.zeros(5, 3)
    gemm.addmm_(acc, a, b)
    torch.testing.assert_close(acc, torch.mm(a, b), rtol=0, atol=0)


def test_bf16_output_layer_gradients_are_fp32_accumulated() -> None:
    """T's ∇W and ∇X for bf16 weights against fp64 math on the same bf16 inputs and fp32 D."""
    n, h, vocab = 16, 32, 20
    x, weight = _bf16(n, h, seed=7), _bf16(vocab, h, seed=8)
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(9))
    labels[::5] = IGNORE_INDEX
    shard = VocabShard.of(vocab, 1, 0)
    state = output_s_pass(x, weight, labels, shard, "alg1")
    stats_phase(state, ThreadGroup(1).comm(0))
    g = token_grad(labels, n)
    logits = x.double() @ weight.double().t()
    d = torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels.clamp_min(0), vocab).double()
    d = d * g.double()[:, None]
    grad_x, grad_w = output_t_pass(state, g)
    # D itself carries fp32 rounding (softmax, exp): relative 2^-22-ish per entry, far below bf16's.
    tol_x = vocab * EPS32 * (d.abs() @ weight.double().abs()) * 4 + 1e-9
    tol_w = n * EPS32 * (d.abs().t() @ x.double().abs()) * 4 + 1e-9
    if gemm.fp32_out_support("cpu")[0]:  # D is rounded to bf16 as the GEMM operand there
        tol_x, tol_w = tol_x * 2**16, tol_w * 2**16
    assert ((grad_x.double() - d @ weight.double()).abs() <= tol_x).all()
    assert ((grad_w.double() - d.t() @ x.double()).abs() <= tol_w).all()
