"""Vocabulary padding and sharding: which rows a rank owns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vptrain.vocab.shard import IGNORE_INDEX, VocabShard, padded_vocab_rows, shard_range


@given(st.integers(1, 5000), st.integers(1, 16), st.integers(1, 128))
def test_padded_rows_is_the_smallest_common_multiple_above_vocab(vocab: int, shards: int, multiple: int) -> None:
    rows = padded_vocab_rows(vocab, shards, multiple)
    assert rows >= vocab and rows % shards == 0 and rows % multiple == 0
    # Nothing smaller works: the previous common multiple is below the vocabulary.
    step = next(m for m in range(1, shards * multiple + 1) if m % shards == 0 and m % multiple == 0)
    assert rows - step < vocab


@given(st.integers(1, 64), st.integers(1, 8))
def test_shards_tile_the_padded_vocabulary(rows_per_shard: int, shards: int) -> None:
    rows = rows_per_shard * shards
    ranges = [shard_range(rows, shards, r) for r in range(shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    assert {e - s for s, e in ranges} == {rows_per_shard}


def test_shard_range_rejects_unpadded_vocabulary_and_bad_rank() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        shard_range(10, 3, 0)
    with pytest.raises(ValueError, match="not in"):
        shard_range(12, 3, 3)
    with pytest.raises(ValueError):
        padded_vocab_rows(0, 2)


def test_real_rows_of_partly_and_fully_padded_shards() -> None:
    # 10 real tokens, 2 shards, padded to 32 rows: shard 0 = [0, 16) holds all ten, shard 1 none.
    first, second = (VocabShard.of(10, 2, r, pad_to_multiple_of=32) for r in range(2))
    assert (first.start, first.end, first.rows, first.real_rows) == (0, 16, 16, 10)
    assert (second.start, second.end, second.rows, second.real_rows) == (16, 32, 16, 0)
    # 21 tokens over 4 shards of 6: the last one has 3 real rows and 3 padding rows.
    last = VocabShard.of(21, 4, 3)
    assert (last.start, last.end, last.real_rows) == (18, 24, 3)


def test_localize_owns_only_real_rows_of_the_shard() -> None:
    shard = VocabShard.of(21, 4, 3)  # rows 18..23, real 18..20
    ids = torch.tensor([0, 17, 18, 20, 21, 23, IGNORE_INDEX])
    local, owned = shard.localize(ids)
    assert owned.tolist() == [False, False, True, True, False, False, False]
    assert local.tolist() == [0, 0, 0, 2, 0, 0, 0]
