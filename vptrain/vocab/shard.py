"""Which rows of the (padded) vocabulary a rank owns.

The vocabulary is padded so that it splits into equal contiguous shards: `vocab_rows` is a
multiple of the number of shards (and of `vocab.pad_to_multiple_of`). Rows at or past
`vocab_size` are padding: they exist in the weight tensors so every shard has the same shape,
but the layers in this package never let them into a softmax, a target or a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import torch

IGNORE_INDEX = -100
"""Label of a token that contributes neither loss nor gradient (same as F.cross_entropy)."""


def padded_vocab_rows(vocab_size: int, num_shards: int, pad_to_multiple_of: int = 1) -> int:
    """Smallest row count >= vocab_size that is a multiple of num_shards and pad_to_multiple_of."""
    if vocab_size < 1 or num_shards < 1 or pad_to_multiple_of < 1:
        raise ValueError(
            f"need vocab_size, num_shards, pad_to_multiple_of >= 1, got {vocab_size}, {num_shards}, "
            f"{pad_to_multiple_of}"
        )
    multiple = num_shards * pad_to_multiple_of // gcd(num_shards, pad_to_multiple_of)
    return -(-vocab_size // multiple) * multiple


def shard_range(vocab_rows: int, num_shards: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of shard `rank` when `vocab_rows` is cut into `num_shards` equal pieces."""
    if num_shards < 1 or not 0 <= rank < num_shards:
        raise ValueError(f"rank {rank} is not in [0, {num_shards})")
    if vocab_rows % num_shards:
        raise ValueError(
            f"vocab_rows={vocab_rows} is not a multiple of num_shards={num_shards}; pad it first (padded_vocab_rows)"
        )
    rows = vocab_rows // num_shards
    return rank * rows, (rank + 1) * rows


@dataclass(frozen=True)
class VocabShard:
    """Rows [start, end) of a padded table whose first `vocab_size` rows are real tokens."""

    start: int
    end: int
    vocab_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad shard range [{self.start}, {self.end})")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @classmethod
    def of(cls, vocab_size: int, num_shards: int, rank: int, *, pad_to_multiple_of: int = 1) -> VocabShard:
        """The shard of `rank` after padding the vocabulary for `num_shards` shards."""
        rows = padded_vocab_rows(vocab_size, num_shards, pad_to_multiple_of)
        start, end = shard_range(rows, num_shards, rank)
        return cls(start, end, vocab_size)

    @property
    def rows(self) -> int:
        """Rows of the shard tensor, padding included."""
        return self.end - self.start

    @property
    def real_rows(self) -> int:
        """Leading rows of the shard that are real tokens (0 for a shard made only of padding)."""
        return max(0, min(self.end, self.vocab_size) - self.start)

    def localize(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in this shard, owned mask) for global token ids; not-owned ids map to row 0.

        Padding rows are never owned: a valid id is < vocab_size, and IGNORE_INDEX is negative.
        """
        owned = (ids >= self.start) & (ids < self.start + self.real_rows)
        local = torch.where(owned, ids - self.start, torch.zeros_like(ids))
        return local, owned
