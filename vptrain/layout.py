"""Where everything lives: transformer layers per stage, vocabulary rows per rank, rank -> (pp, dp).

Pure Python (no torch): `vptrain plan` and the engine call the same functions.

Rank map: global rank = dp_index * pp + pp_index, so the pipeline index varies fastest and the ranks
of one pipeline are contiguous (one node holds whole pipelines when pp divides the GPUs per node).

Layers per stage:
  * `layout.layers_per_stage` when given;
  * redis: counts that balance the estimated stage compute, the input layer counted on the first
    stage and the output layer + loss on the last, in transformer-layer units from the cost model;
  * otherwise an even split with the remainder on the later stages (in 1F1B they keep fewer
    microbatches in flight, so the extra layers cost them the least activation memory).
V-Half has 2 * pp stages: stage s lives on rank s (chunk 0) for s < pp, else on rank 2pp-1-s (chunk 1).

Vocabulary rows: vocab methods give every rank V_padded / pp contiguous rows of both tables (rank r:
rows [r*V_padded/pp, (r+1)*V_padded/pp)); baseline/redis put the whole input table on the first
stage and the whole output table on the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vptrain.config import RunConfig, padded_vocab_size
from vptrain.schedule.costs import ModelShape, vocab_layer_units
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


def rank_map(cfg: RunConfig) -> list[RankCoord]:
    pp, dp = cfg.layout.pp, cfg.layout.dp
    return [RankCoord(rank=d * pp + s, pp=s, dp=d) for d in range(dp) for s in range(pp)]


def stage_map(cfg: RunConfig) -> StageMap:
    return StageMap(cfg.layout.pp, cfg.schedule.name)


def model_shape(cfg: RunConfig) -> ModelShape:
    m = cfg.model
    return ModelShape(
        vocab=m.vocab_size,
        vocab_rows=padded_vocab_size(cfg),
        layers=m.num_layers,
        hidden=m.hidden_size,
        seq=m.seq_len,
        micro_batch=cfg.train.micro_batch_size,
        act_bytes=2 if cfg.precision == "bf16" else 4,
        tied=m.tie_embeddings,
    )


def stage_layers(cfg: RunConfig) -> list[int]:
    """Transformer layers per pipeline stage, in stage order."""
    if cfg.layout.layers_per_stage is not None:
        return list(cfg.layout.layers_per_stage)
    stages = stage_map(cfg).num_stages
    total = cfg.model.num_layers
    if cfg.method.name == "redis":
        first, last = vocab_layer_units(model_shape(cfg))
        extras = [0.0] * stages
        extras[0] += first
        extras[-1] += last
        return balance_layers(total, extras)
    return even_split(total, stages)


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


def rank_layouts(cfg: RunConfig) -> list[RankLayout]:
    """One entry per pipeline rank."""
    stages = stage_map(cfg)
    per_stage = stage_layers(cfg)
    starts = [sum(per_stage[:s]) for s in range(len(per_stage))]
    rows = padded_vocab_size(cfg)
    p = cfg.layout.pp
    sharded = cfg.method.name not in ("baseline", "redis")
    loss_rank = stages.loss_place[0]
    out = []
    for r in range(p):
        held = tuple(stages.stage(r, c) for c in range(stages.chunks))
        shard = (r * rows // p, (r + 1) * rows // p)
        embedding = shard if sharded else ((0, rows) if r == stages.embed_place[0] else (0, 0))
        output = shard if sharded else ((0, rows) if r == loss_rank else (0, 0))
        out.append(
            RankLayout(
                pp_rank=r,
                stages=held,
                layers=tuple(per_stage[s] for s in held),
                first_layer=tuple(starts[s] for s in held),
                embedding_rows=embedding,
                output_rows=output,
                position_embedding=r == stages.embed_place[0],
                final_norm=r == loss_rank,
                loss=r == loss_rank,
            )
        )
    return out
