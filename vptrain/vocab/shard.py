"""Which rows of the (padded) vocabulary a rank owns.

The vocabulary is padded so that it splits into equal contiguous shards: `vocab_rows` is a
multiple of the number of shards (and of `vocab.pad_to_multiple_of`). Rows at or past
`vocab_size` are padding: they exist in the weight tensors so every shard has the same shape,
but the layers in this package never let them into a softmax, a target or a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The padding and shard rules are the layout's (one definition, torch-free for the planner).
from vptrain.layout import padded_vocab_rows, shard_range

__all__ = ["IGNORE_INDEX", "VocabShard", "padded_vocab_rows", "shard_range"]

IGNORE_INDEX = -100
"""Label of a token that contributes neither loss nor gradient (same as F.cross_entropy)."""


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
