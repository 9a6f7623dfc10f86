"""One resolved plan per run: what `vptrain plan` prints, what the trainer executes, what W&B logs.

    plan = resolve(cfg)
    plan.layout.stage_layers        transformer layers per stage (2p stages on V-Half)
    plan.layout.ranks[r]            what pipeline rank r holds: chunks, layers, vocabulary rows
    plan.layout.rank_map            global rank -> (pp, dp)
    plan.layout.vocab               padded vocabulary rows and the shard of each rank
    plan.costs, plan.schedule       the cost model's seconds per pass and the schedule built from
                                    them (validated): plan.actions(r) is rank r's action list

Everything here is derived from the config once, by the rules of vptrain/layout.py and the cost
model; no other module derives a stage's layers, a shard's rows or the schedule from the config.
Pure Python (no torch): the planner imports it without starting torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vptrain.config import VOCAB_METHODS, RunConfig, default_intermediate_size, microbatches
from vptrain.layout import (
    RankCoord,
    RankLayout,
    balance_layers,
    even_split,
    padded_vocab_rows,
    shard_range,
)
from vptrain.schedule import PassCosts, Schedule, ScheduleRules, build_schedule, format_schedule, validate_schedule
from vptrain.schedule.costs import (
    ModelShape,
    default_chunk_tokens,
    device_profile,
    nominal_costs,
    pass_costs,
    vocab_layer_units,
)
from vptrain.schedule.kinds import schedule_kind
from vptrain.schedule.memo import ScheduleMemo
from vptrain.schedule.rules import StageMap

GIB = float(1 << 30)


@dataclass(frozen=True)
class VocabShards:
    """The padded vocabulary and how it is cut: `shards` equal pieces of `rows // shards` rows
    (the vocabulary methods: one per pipeline rank; baseline/redis: one, the whole table)."""

    vocab_size: int
    """Real tokens; rows at or past it are padding."""
    rows: int
    """Padded rows of each table (a multiple of `shards` and of vocab.pad_to_multiple_of)."""
    shards: int

    @property
    def rows_per_shard(self) -> int:
        return self.rows // self.shards

    def span(self, shard: int) -> tuple[int, int]:
        return shard_range(self.rows, self.shards, shard)


@dataclass(frozen=True)
class ResolvedLayout:
    """Where everything lives; cheap to resolve (no schedule)."""

    stages: StageMap
    stage_layers: tuple[int, ...]
    rank_map: tuple[RankCoord, ...]
    ranks: tuple[RankLayout, ...]
    """One entry per pipeline rank."""
    vocab: VocabShards
    shape: ModelShape
    chunk_tokens: int
    """Output-layer chunk as the run uses it (vocab.chunk_tokens, or chosen from gpu_memory_gb)."""
    num_microbatches: int


@dataclass(frozen=True)
class ResolvedPlan:
    cfg: RunConfig
    layout: ResolvedLayout
    costs: PassCosts
    """The cost model's seconds per pass for this config (what the planner simulates)."""
    schedule: Schedule
    """Built from `costs` (costs.nominal_costs) and validated."""
    rules: ScheduleRules
    """The schedule's dependency rules (with the memo the validator filled, for the simulator)."""

    def actions(self, pp_rank: int) -> tuple:
        return self.schedule.ranks[pp_rank]

    def rank(self, pp_rank: int) -> RankLayout:
        return self.layout.ranks[pp_rank]

    def schedule_text(self) -> str:
        """schedule.txt: format_schedule's text with, after its metadata line, one comment line per rank
        naming the stages its chunks hold (`# rank 0: stages 0, 7`); parse_schedule skips comments."""
        lines = format_schedule(self.schedule).splitlines()
        held = [f"# rank {r.pp_rank}: stages {', '.join(str(s) for s in r.stages)}" for r in self.layout.ranks]
        return "\n".join(lines[:2] + held + lines[2:]) + "\n"

    def summary(self) -> dict:
        """The plan in a few JSON values (plan.json's "resolved", W&B's config "plan")."""
        lay, cfg = self.layout, self.cfg
        text = self.schedule_text()
        return {
            "method": cfg.method.name,
            "schedule": cfg.schedule.name,
            "pp": cfg.layout.pp,
            "dp": cfg.layout.dp,
            "microbatches": lay.num_microbatches,
            "stage_layers": list(lay.stage_layers),
            "vocab_size": lay.vocab.vocab_size,
            "padded_vocab_size": lay.vocab.rows,
            "vocab_shards": lay.vocab.shards,
            "vocab_rows_per_shard": lay.vocab.rows_per_shard,
            "chunk_tokens": lay.chunk_tokens,
            "ranks": [
                {"pp_rank": r.pp_rank, "stages": list(r.stages), "layers": list(r.layers),
                 "embedding_rows": list(r.embedding_rows), "output_rows": list(r.output_rows)}
                for r in lay.ranks
            ],
            "rank_map": {str(c.rank): {"pp": c.pp, "dp": c.dp} for c in lay.rank_map},
            "actions_per_rank": [len(row) for row in self.schedule.ranks],
            # The digest of schedule.txt: a W&B run and a `vptrain plan` directory compare at a glance.
            "schedule_sha1": hashlib.sha1(text.encode()).hexdigest(),
        }


def vocab_shards(cfg: RunConfig) -> VocabShards:
    shards = cfg.layout.pp if cfg.method.name in VOCAB_METHODS else 1
    rows = padded_vocab_rows(cfg.model.vocab_size, shards, cfg.vocab.pad_to_multiple_of)
    return VocabShards(cfg.model.vocab_size, rows, shards)


def _shape(cfg: RunConfig, vocab: VocabShards) -> ModelShape:
    m = cfg.model
    return ModelShape(
        vocab=m.vocab_size, vocab_rows=vocab.rows, layers=m.num_layers, hidden=m.hidden_size, seq=m.seq_len,
        micro_batch=cfg.train.micro_batch_size, act_bytes=2 if cfg.precision == "bf16" else 4,
        tied=m.tie_embeddings, arch=m.arch, kv_dim=(m.num_kv_heads or m.num_heads) * (m.hidden_size // m.num_heads),
        intermediate=(m.intermediate_size or default_intermediate_size(m.hidden_size)) if m.arch == "llama" else 0,
        recompute=m.activation_checkpointing,
    )


def _stage_layers(cfg: RunConfig, stages: StageMap, shape: ModelShape) -> list[int]:
    if cfg.layout.layers_per_stage is not None:
        return list(cfg.layout.layers_per_stage)
    total = cfg.model.num_layers
    if cfg.method.name == "redis":
        first, last = vocab_layer_units(shape)
        extras = [0.0] * stages.num_stages
        extras[0] += first
        extras[-1] += last
        return balance_layers(total, extras)
    return even_split(total, stages.num_stages)


def _chunk_tokens(cfg: RunConfig, shape: ModelShape) -> int:
    if cfg.vocab.chunk_tokens is not None:
        return cfg.vocab.chunk_tokens
    if cfg.method.name not in VOCAB_METHODS:
        return 0  # no vocabulary passes: the one-shard kernel takes the microbatch at once
    return default_chunk_tokens(shape, p=cfg.layout.pp, act_bytes=shape.act_bytes,
                                memory_bytes=cfg.cluster.gpu_memory_gb * GIB)


def _rank_layouts(stages: StageMap, per_stage: list[int], vocab: VocabShards) -> list[RankLayout]:
    starts = [sum(per_stage[:s]) for s in range(len(per_stage))]
    embed_rank, loss_rank = stages.embed_place[0], stages.loss_place[0]
    whole = (0, vocab.rows)
    out = []
    for r in range(stages.p):
        held = tuple(stages.stage(r, c) for c in range(stages.chunks))
        if vocab.shards > 1:
            embedding = output = vocab.span(r)
        else:
            embedding = whole if r == embed_rank else (0, 0)
            output = whole if r == loss_rank else (0, 0)
        out.append(RankLayout(
            pp_rank=r, stages=held, layers=tuple(per_stage[s] for s in held),
            first_layer=tuple(starts[s] for s in held), embedding_rows=embedding, output_rows=output,
            position_embedding=r == embed_rank, final_norm=r == loss_rank, loss=r == loss_rank,
        ))
    return out


def resolve_layout(cfg: RunConfig) -> ResolvedLayout:
    """The layout part of the plan (no schedule): layers, rank map, vocabulary shards."""
    pp, dp = cfg.layout.pp, cfg.layout.dp
    stages = StageMap(pp, cfg.schedule.name, virtual_chunks(cfg))
    vocab = vocab_shards(cfg)
    shape = _shape(cfg, vocab)
    per_stage = _stage_layers(cfg, stages, shape)
    return ResolvedLayout(
        stages=stages,
        stage_layers=tuple(per_stage),
        rank_map=tuple(RankCoord(rank=d * pp + s, pp=s, dp=d) for d in range(dp) for s in range(pp)),
        ranks=tuple(_rank_layouts(stages, per_stage, vocab)),
        vocab=vocab,
        shape=shape,
        chunk_tokens=_chunk_tokens(cfg, shape),
        num_microbatches=microbatches(cfg),
    )


def layout_pass_costs(cfg: RunConfig, layout: ResolvedLayout) -> PassCosts:
    return pass_costs(
        layout.shape, method=cfg.method.name, p=cfg.layout.pp, chunk_layers=[r.layers for r in layout.ranks],
        loss_place=layout.stages.loss_place, precision=cfg.precision,
        device=device_profile(cfg.cluster.profile, devices_per_node=cfg.cluster.gpus_per_node),
        store_softmax=cfg.vocab.store_softmax,
        groups=[[c.rank for c in layout.rank_map if c.dp == d] for d in range(cfg.layout.dp)],
        split=schedule_kind(cfg.schedule.name).split_backward,
    )


def costed_schedule(cfg: RunConfig, costs: PassCosts) -> Schedule:
    """The schedule of `cfg` built with the relative pass costs of `costs` (costs.nominal_costs)."""
    return build_schedule(cfg.method.name, cfg.schedule.name, cfg.layout.pp, microbatches(cfg),
                          nominal=nominal_costs(costs), chunks=virtual_chunks(cfg), w_reserve=cfg.schedule.w_reserve)


def virtual_chunks(cfg: RunConfig) -> int:
    """Model chunks per rank where the schedule takes it from the config (interleaved), else 0."""
    return cfg.schedule.virtual_stages if schedule_kind(cfg.schedule.name).fixed_chunks is None else 0


def resolve(cfg: RunConfig, *, check_deadlock: bool = True, memo: ScheduleMemo | None = None) -> ResolvedPlan:
    """The whole plan of `cfg`. The schedule is validated; check_deadlock=False skips the deadlock
    search when the caller simulates the schedule next (simulation proves deadlock freedom too).
    `memo` (schedule/memo.py, held by a loop of plans such as the search) reuses a schedule already
    built and validated from the same (method, schedule, p, m, nominal costs)."""
    layout = resolve_layout(cfg)
    costs = layout_pass_costs(cfg, layout)
    if memo is not None:
        schedule, rules = memo.validated(cfg.method.name, cfg.schedule.name, cfg.layout.pp, microbatches(cfg),
                                         nominal_costs(costs), check_deadlock=check_deadlock,
                                         chunks=virtual_chunks(cfg), w_reserve=cfg.schedule.w_reserve)
        return ResolvedPlan(cfg=cfg, layout=layout, costs=costs, schedule=schedule, rules=rules)
    schedule = costed_schedule(cfg, costs)
    rules = ScheduleRules.of(method=schedule.method, name=schedule.name, p=schedule.p, chunks=schedule.chunks)
    validate_schedule(schedule, check_deadlock=check_deadlock, rules=rules)
    return ResolvedPlan(cfg=cfg, layout=layout, costs=costs, schedule=schedule, rules=rules)
