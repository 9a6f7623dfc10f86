"""The fp64 gradient norm and clip every engine uses (vptrain/engine/grad_norm.py)."""

from __future__ import annotations

import torch

from vptrain.engine.grad_norm import CHUNK_ELEMENTS, clip_by_norm_, clip_grad_norm_fp64, squared_norm_fp64

CPU = torch.device("cpu")


def _table(rows: int = 4099, cols: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.logspace(-6, 0, rows).unsqueeze(1)  # wide range


def test_the_norm_of_a_sharded_table_does_not_depend_on_how_it_is_split():
    table = _table()
    exact = table.double().square().sum()
    whole = squared_norm_fp64([table], CPU)
    for shards in (2, 3, 8):
        parts = list(table.tensor_split(shards))
        for order in (parts, parts[::-1]):
            total = sum(squared_norm_fp64([p], CPU) for p in order)  # as ranks would add their shares
            torch.testing.assert_close(total, exact, rtol=1e-14, atol=0)
            torch.testing.assert_close(total, whole, rtol=1e-14, atol=0)


def test_tensors_larger_than_one_chunk_are_summed_whole():
    big = torch.full((CHUNK_ELEMENTS + 5,), 0.5)
    assert squared_norm_fp64([big], CPU).item() == 0.25 * (CHUNK_ELEMENTS + 5)


def test_clip_matches_torchs_coefficient():
    params = [torch.nn.Parameter(torch.zeros(5, 7)), torch.nn.Parameter(torch.zeros(11))]
    grads = [_table(5, 7, seed=1) * 3, _table(11, 1, seed=2).flatten() * 3]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q, g in zip(params, ours, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    norm = clip_grad_norm_fp64(ours, 0.5)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm.float(), ref_norm, rtol=1e-6, atol=0)
    for p, q in zip(params, ours, strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
    assert clip_grad_norm_fp64(ours, 0.5).item() < 0.5  # clipped: the second norm is below max_norm


def test_a_small_norm_or_no_max_norm_leaves_gradients_alone():
    grads = [torch.tensor([0.1, -0.2])]
    clip_by_norm_(grads, torch.tensor(0.3, dtype=torch.float64), max_norm=1.0)
    clip_by_norm_(grads, torch.tensor(30.0, dtype=torch.float64), max_norm=0.0)
    assert torch.equal(grads[0], torch.tensor([0.1, -0.2]))


def test_a_non_finite_norm_leaves_the_non_finite_gradient_for_the_overflow_check():
    grads = [torch.tensor([float("inf"), 1.0])]
    clip_by_norm_(grads, squared_norm_fp64(grads, CPU).sqrt(), max_norm=1.0)
    assert torch.equal(grads[0], torch.tensor([float("inf"), 1.0]))  # not zeroed: the step is skipped
