"""Random output-layer problems for the vocabulary-layer tests (unit and gloo)."""

from __future__ import annotations

import torch

from vptrain.vocab import IGNORE_INDEX, padded_vocab_rows


def random_problem(n: int, h: int, vocab: int, shards: int, pad: int, seed: int | torch.Generator,
                   ignore_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, h], the weight [padded rows, h] and n labels in [0, vocab), from `seed` (or a generator).

    The padding rows hold garbage (40.0) that would show in any result it leaked into (it would
    dominate any softmax); every ignore_every-th label is IGNORE_INDEX (0: none).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    weight = torch.randn(padded_vocab_rows(vocab, shards, pad), h, generator=gen)
    weight[vocab:] = 40.0
    x = torch.randn(n, h, generator=gen) * 2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = IGNORE_INDEX
    return x, weight, labels
