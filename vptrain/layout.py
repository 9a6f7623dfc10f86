"""The placement rules: transformer layers per stage, vocabulary rows per shard, rank -> (pp, dp).

Pure arithmetic (no torch, no config): `vptrain.resolved.resolve` applies these rules to a config
once, and `vptrain plan`, the trainer and W&B all read the one plan it returns. The functions below
that take a config are thin delegations to that plan, kept for callers that want one field of it.

Rank map: global rank = dp_index * pp + pp_index, so the pipeline index varies fastest and the ranks
of one pipeline are contiguous (one node holds whole pipelines when pp divides the GPUs per node).

Layers per stage:
  * `layout.layers_per_stage` when given;
  * redis: counts that balance the estimated stage compute, the input layer counted on the first
    stage and the output layer + loss on the last, in transformer-layer units from the cost model
    (balance_layers);
  * otherwise an even split with the remainder on the later stages (in 1F1B they keep fewer
    microbatches in flight, so the extra layers cost them the least activation memory; even_split).
V-Half has 2 * pp stages: stage s lives on rank s (chunk 0) for s < pp, else on rank 2pp-1-s (chunk 1).

Vocabulary rows: the table is padded to the smallest multiple of the shard count and
`vocab.pad_to_multiple_of` at or above V (padded_vocab_rows); vocab methods give every rank
V_padded / pp contiguous rows of both tables (shard_range), baseline/redis put the whole input table
on the first stage and the whole output table on the last (one shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the delegations import lazily: vptrain.resolved imports this module
    from vptrain.config import RunConfig
    from vptrain.schedule.costs import ModelShape
    from vptrain.schedule.rules import StageMap


@dataclass(frozen=True)
class RankCoord:
    rank: int
    pp: int
    dp: int


@dataclass(frozen=True)
class RankLayout:
    """What pipeline rank `pp_rank` holds (the same for every data-parallel replica)."""

    pp_rank: int
    stages: tuple[int, ...]
    """Global stage index of each chunk the rank runs (one entry in 1F1B, two in V-Half)."""
    layers: tuple[int, ...]
    """Transformer layers per chunk."""
    first_layer: tuple[int, ...]
    """Index of each chunk's first transformer layer in the full model."""
    embedding_rows: tuple[int, int]
    """[start, end) rows of the input embedding table on this rank (empty: start == end)."""
    output_rows: tuple[int, int]
    position_embedding: bool
    final_norm: bool
    loss: bool

    @property
    def num_layers(self) -> int:
        return sum(self.layers)


def padded_vocab_rows(vocab_size: int, num_shards: int, pad_to_multiple_of: int = 1) -> int:
    """Smallest row count >= vocab_size that is a multiple of num_shards and pad_to_multiple_of."""
    if vocab_size < 1 or num_shards < 1 or pad_to_multiple_of < 1:
        raise ValueError(
            f"need vocab_size, num_shards, pad_to_multiple_of >= 1, got {vocab_size}, {num_shards}, "
            f"{pad_to_multiple_of}"
        )
    multiple = num_shards * pad_to_multiple_of // math.gcd(num_shards, pad_to_multiple_of)
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


def even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if s >= parts - extra else 0) for s in range(parts)]


def balance_layers(total: int, extras: list[float]) -> list[int]:
    """Integer layers per stage minimising the largest (layers + extra), summing to `total`.

    Stages other than the first and last keep at least one layer. Surplus layers are removed from
    the most loaded stage, earliest first on ties, so leftovers end up on the later stages.
    """
    n = len(extras)
    floor = [0 if s in (0, n - 1) or total < n else 1 for s in range(n)]
    candidates = sorted({round(e + k, 9) for e in extras for k in range(total + 1)})
    caps = floor
    for target in candidates:
        caps = [max(lo, math.floor(target - e + 1e-9)) for lo, e in zip(floor, extras, strict=True)]
        if sum(caps) >= total:
            break
    layers = list(caps)
    for _ in range(sum(layers) - total):
        movable = [s for s in range(n) if layers[s] > floor[s]]
        heaviest = max(movable, key=lambda s: (round(layers[s] + extras[s], 9), -s))
        layers[heaviest] -= 1
    return layers


# Thin delegations to the resolved plan's layout (vptrain.resolved): no second derivation here.


def rank_map(cfg: RunConfig) -> list[RankCoord]:
    from vptrain.resolved import resolve_layout

    return list(resolve_layout(cfg).rank_map)


def stage_map(cfg: RunConfig) -> StageMap:
    from vptrain.resolved import resolve_layout

    return resolve_layout(cfg).stages


def model_shape(cfg: RunConfig) -> ModelShape:
    from vptrain.resolved import resolve_layout

    return resolve_layout(cfg).shape


def stage_layers(cfg: RunConfig) -> list[int]:
    """Transformer layers per pipeline stage, in stage order."""
    from vptrain.resolved import resolve_layout

    return list(resolve_layout(cfg).stage_layers)


def rank_layouts(cfg: RunConfig) -> list[RankLayout]:
    """One entry per pipeline rank."""
    from vptrain.resolved import resolve_layout

    return list(resolve_layout(cfg).ranks)
