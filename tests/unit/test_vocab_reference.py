"""The single-process sharded reference against the unsharded PyTorch layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vptrain.vocab import reference as ref
from vptrain.vocab.grads import token_grad
from vptrain.vocab.shard import IGNORE_INDEX, padded_vocab_rows

RTOL, ATOL = 1e-5, 1e-6


def _problem(n: int, h: int, vocab: int, shards: int, pad: int = 1, seed: int = 0):
    """Inputs, labels and a padded table whose padding rows hold large garbage on purpose."""
    gen = torch.Generator().manual_seed(seed)
    rows = padded_vocab_rows(vocab, shards, pad)
    weight = torch.randn(rows, h, generator=gen)
    weight[vocab:] = 50.0  # would dominate any softmax it leaked into
    x = torch.randn(n, h, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return x, weight, labels


def _unsharded(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int):
    xr = x.clone().requires_grad_()
    wr = weight[:vocab].clone().requires_grad_()
    loss = F.cross_entropy(xr @ wr.t(), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


CASES = {
    "divisible": dict(vocab=24, shards=3, pad=1),
    "not_divisible": dict(vocab=23, shards=3, pad=1),
    "pad_to_multiple": dict(vocab=19, shards=2, pad=8),
    "padding_only_shard": dict(vocab=10, shards=2, pad=32),
    "one_shard": dict(vocab=17, shards=1, pad=1),
    "many_shards": dict(vocab=13, shards=5, pad=1),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("labelling", ["random", "all_in_first_shard", "all_in_last_shard", "masked"])
def test_reference_output_layer_equals_cross_entropy(name: str, labelling: str) -> None:
    c = CASES[name]
    vocab, shards = c["vocab"], c["shards"]
    x, weight, labels = _problem(12, 6, vocab, shards, c["pad"])
    shard_list = ref.shards_of(vocab, shards, c["pad"])
    real = [s for s in shard_list if s.real_rows > 0]
    if labelling == "all_in_first_shard":
        labels = real[0].start + labels % real[0].real_rows
    elif labelling == "all_in_last_shard":  # the partly padded one when vocab is not divisible
        labels = real[-1].start + labels % real[-1].real_rows
    elif labelling == "masked":
        labels[::3] = IGNORE_INDEX
    loss, gx, gw = _unsharded(x, weight, labels, vocab)
    n_kept = int((labels != IGNORE_INDEX).sum())
    out = ref.output_layer(x, weight, labels, vocab, shards, token_grad(labels, n_kept), pad_to_multiple_of=c["pad"])
    torch.testing.assert_close(out.per_token_loss.sum() / n_kept, loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.grad_x, gx, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.grad_w[:vocab], gw, rtol=RTOL, atol=ATOL)
    assert torch.count_nonzero(out.grad_w[vocab:]) == 0
    if labelling == "masked":
        assert torch.all(out.per_token_loss[::3] == 0) and torch.all(out.grad_x_hat[::3] == 0)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_rescaled_local_softmax_is_the_global_softmax_slice(shards: int) -> None:
    vocab = 29
    x, weight, labels = _problem(9, 5, vocab, shards)
    x = x * 4  # spread the logits so local maxima differ a lot between shards
    stats = [ref.local_stats(x, weight[s.start : s.end], labels, s) for s in ref.shards_of(vocab, shards)]
    gmax, gsum, _ = ref.merge_stats(stats)
    full = torch.softmax(x @ weight[:vocab].t(), dim=1)
    for st in stats:
        alpha = ref.rescale_factor(st, gmax, gsum)
        assert torch.all(alpha <= 1.0 + 1e-6)
        sl = full[:, st.shard.start : st.shard.start + st.shard.real_rows]
        torch.testing.assert_close(alpha[:, None] * st.local_softmax, sl, rtol=RTOL, atol=1e-7)
        # The local softmax alone is not the global slice unless the shard is the whole vocabulary.
        # (29 over 7 shards pads to 35 rows: the last shard is padding only, with nothing to compare.)
        if shards > 1 and st.shard.real_rows > 0:
            assert not torch.allclose(st.local_softmax, sl, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(torch.log(gsum) + gmax, torch.logsumexp(x @ weight[:vocab].t(), 1))


def test_alg2_input_gradient_form_equals_the_alg1_form() -> None:
    vocab, shards = 31, 4
    x, weight, labels = _problem(10, 7, vocab, shards)
    g = torch.rand(10)
    out = ref.output_layer(x, weight, labels, vocab, shards, g)
    torch.testing.assert_close(out.grad_x_hat * g[:, None], out.grad_x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("vocab,shards,pad", [(24, 3, 1), (23, 3, 1), (10, 2, 32)])
def test_reference_input_layer_equals_embedding(vocab: int, shards: int, pad: int) -> None:
    gen = torch.Generator().manual_seed(1)
    rows = padded_vocab_rows(vocab, shards, pad)
    weight = torch.randn(rows, 4, generator=gen)
    weight[vocab:] = 50.0
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    ids[0, :3] = ids[1, 0]  # repeated tokens accumulate
    grad_emb = torch.randn(3, 7, 4, generator=gen)
    emb_layer = torch.nn.Embedding(vocab, 4)
    with torch.no_grad():
        emb_layer.weight.copy_(weight[:vocab])
    expected = emb_layer(ids)
    expected.backward(grad_emb)
    emb, grad_w = ref.input_layer(ids, weight, vocab, shards, grad_emb, pad_to_multiple_of=pad)
    torch.testing.assert_close(emb, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad_w[:vocab], emb_layer.weight.grad, rtol=RTOL, atol=ATOL)
    assert torch.count_nonzero(grad_w[vocab:]) == 0
