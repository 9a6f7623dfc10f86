"""The split backward (vptrain/engine/split_backward.py): B's input gradient and W's weight gradients
are exactly (bitwise, fp64) those of one plain backward, B leaves every weight's .grad alone, and W
accumulates through autograd (post-accumulate hooks fire, existing .grad is added to)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vptrain.engine.split_backward import backward_input
from vptrain.models.gpt import Block
from vptrain.models.shape import TransformerShape


def _plain(fn, x, weights, g):
    """Input and weight gradients of fn(x) under one plain backward (fresh leaves)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    ws = [w.detach().clone().requires_grad_() for w in weights]
    outs = fn(x, *ws)
    torch.autograd.backward(outs, g)
    return x.grad, [w.grad for w in ws]


def _split(fn, x, weights, g):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    ws = [w.detach().clone().requires_grad_() for w in weights]
    outs = fn(x, *ws)
    (gx,), work = backward_input(outs, g, [x], ws)
    assert all(w.grad is None for w in ws), "B touched a weight gradient"
    if x.requires_grad:
        assert x.grad is gx or torch.equal(x.grad, gx)
    work.run()
    return gx, [w.grad for w in ws]


def _mlp(x, w1, b1, w2, ln):
    h = torch.tanh(x @ w1 + b1)
    h = nn.functional.layer_norm(h, h.shape[-1:], weight=ln)
    return [h @ w2]


def _reused(x, a, b):
    # b is used on both sides of a's frontier: two frontier nodes in b's group, one feeding the other.
    return [((x * b) @ a) * b.sum()]


def _two_outputs(x, w, out_w):
    # Like the plain pipeline's last stage: (hidden, output weight) where the weight is an output itself.
    return [torch.relu(x @ w), out_w * 1.0, out_w]


# The stage function and its weights' shapes; the input is 5 x 4.
CASES = {
    "mlp": (_mlp, [(4, 6), (6,), (6, 3), (6,)]),
    "reused": (_reused, [(4, 4), (4,)]),
    "two_outputs": (_two_outputs, [(4, 4), (3, 4)]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("input_grad", [True, False])
def test_split_equals_plain_backward(name, input_grad):
    fn, shapes = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen).requires_grad_(input_grad)
    weights = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
    outs = fn(x.detach(), *weights)
    g = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs]
    ref_x, ref_w = _plain(fn, x, weights, g)
    got_x, got_w = _split(fn, x, weights, g)
    if input_grad:
        assert torch.equal(got_x, ref_x)
    else:
        assert got_x is None
    for i, (a, b) in enumerate(zip(got_w, ref_w, strict=True)):
        assert torch.equal(a, b), f"weight {i}"


def test_transformer_block_and_accumulation():
    """A real block, two microbatches run B1 B2 W1 W2 (W deferred past another B): the sums equal
    two plain backwards; post-accumulate hooks fire in W only; an unused weight keeps grad None."""
    shape = TransformerShape(vocab_size=8, vocab_rows=8, num_layers=2, hidden_size=8, num_heads=2, seq_len=4,
                             init_std=0.02, seed=0)
    torch.manual_seed(0)
    block = Block(shape, 0).double()
    ref = Block(shape, 0).double()
    ref.load_state_dict(block.state_dict())
    unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    xs = [torch.randn(2, 4, 8, dtype=torch.float64) for _ in range(2)]
    gs = [torch.randn(2, 4, 8, dtype=torch.float64) for _ in range(2)]
    ref_dx = []
    for x, g in zip(xs, gs, strict=True):
        x = x.clone().requires_grad_()
        ref(x).backward(g)
        ref_dx.append(x.grad)
    fired = []
    for p in block.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    works = []
    for x, g, want in zip(xs, gs, ref_dx, strict=True):
        x = x.clone().requires_grad_()
        (dx,), work = backward_input([block(x)], [g], [x], [*block.parameters(), unused])
        assert torch.equal(dx, want)
        works.append(work)
    assert not fired and all(p.grad is None for p in block.parameters())
    for work in works:
        work.run()
    assert len(fired) == 2 * len(list(block.parameters()))
    assert unused.grad is None
    for (name, a), b in zip(block.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


class _CountingTanh(torch.autograd.Function):
    """tanh whose backward counts its calls: it sits on the input-gradient chain between two weights."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        _CountingTanh.calls += 1
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_weight_pass_does_not_rerun_the_input_chain():
    w1, w2 = (torch.randn(4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _CountingTanh.calls = 0
    (dx,), work = backward_input([_CountingTanh.apply(x @ w1) @ w2], [torch.ones(3, 4, dtype=torch.float64)],
                                 [x], [w1, w2])
    assert _CountingTanh.calls == 1 and dx is not None
    work.run()
    assert _CountingTanh.calls == 1, "W ran the input-gradient chain again"
    assert w1.grad is not None and w2.grad is not None


def test_a_non_leaf_input_is_refused():
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True) * 2
    with pytest.raises(ValueError, match="leaf"):
        backward_input([x @ w], [torch.ones(2, 2, dtype=torch.float64)], [x], [w])
