"""The resolved plan (vptrain/resolved.py): one derivation of layers, vocabulary rows, rank map and
schedule that the planner prints and the trainer builds its modules from."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import validated_config

from vptrain.config import RunConfig, padded_vocab_size
from vptrain.engine.common import gpt_shape
from vptrain.engine.pipeline import layer_boundaries
from vptrain.model import GPT, layer_list, output_weight_rows, token_embedding_rows
from vptrain.plan import make_plan, plan_dict, planned_schedule
from vptrain.resolved import resolve, resolve_layout
from vptrain.vocab import VocabShard
from vptrain.wandb_logger import run_config


def _cfg(**overrides) -> RunConfig:
    return validated_config(**overrides)


SMALL = {"model.hidden_size": 16, "model.num_heads": 2, "model.seq_len": 8, "train.global_batch_size": 8}
CASES = {
    "vocab-2 pp3 V500 pad8": dict(SMALL, **{"method.name": "vocab-2", "layout.pp": 3, "model.num_layers": 7,
                                            "model.vocab_size": 500, "vocab.pad_to_multiple_of": 8}),
    "vocab-1 vhalf pp2 V509 tied": dict(SMALL, **{"method.name": "vocab-1", "schedule.name": "vhalf",
                                                  "layout.pp": 2, "model.num_layers": 4, "model.vocab_size": 509,
                                                  "model.tie_embeddings": True}),
    "interlaced pp4 V37": dict(SMALL, **{"method.name": "interlaced", "layout.pp": 4, "model.num_layers": 4,
                                         "model.vocab_size": 37}),
    "baseline pp3 V509 pad8": dict(SMALL, **{"method.name": "baseline", "layout.pp": 3, "model.num_layers": 5,
                                             "model.vocab_size": 509, "vocab.pad_to_multiple_of": 8}),
    "redis pp2 V4096": dict(SMALL, **{"method.name": "redis", "layout.pp": 2, "model.num_layers": 6,
                                      "model.vocab_size": 4096}),
    "baseline vhalf pp2": dict(SMALL, **{"method.name": "baseline", "schedule.name": "vhalf", "layout.pp": 2,
                                         "model.num_layers": 4, "model.vocab_size": 300}),
    "baseline pp1 V300 pad64": dict(SMALL, **{"method.name": "baseline", "layout.pp": 1, "model.num_layers": 2,
                                              "model.vocab_size": 300, "vocab.pad_to_multiple_of": 64}),
}


def _stage_modules(cfg: RunConfig, plan) -> list[list[torch.nn.Module]]:
    """The modules each pipeline rank builds, sliced from the layer list as the trainers slice it
    (engine/pipeline.layer_boundaries over the plan's stage layers), plus its vocabulary rows."""
    lay = plan.layout
    shape = gpt_shape(cfg, vocab_rows=lay.vocab.rows)
    sharded = lay.vocab.shards > 1
    specs = layer_list(shape, with_vocab=not sharded)
    bounds = layer_boundaries(list(lay.stage_layers), leading=1, trailing=1 if sharded else 2)
    out = []
    for rank in lay.ranks:
        mods = [cls(*args) for s in rank.stages for cls, args in specs[bounds[s]:bounds[s + 1]]]
        if sharded:
            table = torch.nn.Parameter(token_embedding_rows(shape, *rank.embedding_rows))
            mods.append(torch.nn.ParameterList([table]))
            if not cfg.model.tie_embeddings:
                mods.append(torch.nn.ParameterList([torch.nn.Parameter(output_weight_rows(shape, *rank.output_rows))]))
        out.append(mods)
    return out


@pytest.mark.parametrize("name", [n for n in CASES if "pp1" not in n])
def test_every_rank_builds_exactly_the_parameters_the_plan_counts(name: str) -> None:
    cfg = _cfg(**CASES[name])
    plan = make_plan(cfg)
    built = _stage_modules(cfg, plan.resolved)
    for stage, mods in zip(plan.stages, built, strict=True):
        # Tied tables are one tensor: the plan counts the shared rows once, on both uses' rank.
        assert sum(p.numel() for m in mods for p in m.parameters()) == stage.parameters, (name, stage.layout)
    layers_built = [sum(m.__class__.__name__ == "Block" for m in mods) for mods in built]
    assert layers_built == [r.num_layers for r in plan.resolved.layout.ranks]
    assert sum(layers_built) == cfg.model.num_layers


@pytest.mark.parametrize("name", list(CASES))
def test_padded_vocabulary_and_rows_per_rank_are_what_the_model_builds(name: str) -> None:
    cfg = _cfg(**CASES[name])
    lay = resolve_layout(cfg)
    vocab, pp = lay.vocab, cfg.layout.pp
    pad = cfg.vocab.pad_to_multiple_of
    assert padded_vocab_size(cfg) == vocab.rows >= cfg.model.vocab_size
    assert vocab.rows % pad == 0 and vocab.rows - cfg.model.vocab_size < vocab.shards * pad
    shape = gpt_shape(cfg, vocab_rows=vocab.rows)
    if vocab.shards > 1:
        assert vocab.shards == pp and vocab.rows_per_shard * pp == vocab.rows
        spans = [r.output_rows for r in lay.ranks]
        assert [r.embedding_rows for r in lay.ranks] == spans
        assert spans == [(r * vocab.rows_per_shard, (r + 1) * vocab.rows_per_shard) for r in range(pp)]
        for r, (start, end) in enumerate(spans):
            # The vocabulary layers' own constructor pads and cuts the same way.
            assert VocabShard.of(cfg.model.vocab_size, pp, r, pad_to_multiple_of=pad) == VocabShard(
                start, end, cfg.model.vocab_size)
            assert token_embedding_rows(shape, start, end).shape == (vocab.rows_per_shard, shape.hidden_size)
        assert sum(VocabShard(a, b, cfg.model.vocab_size).real_rows for a, b in spans) == cfg.model.vocab_size
    else:
        model = GPT(shape)  # the single-process model: whole tables of the plan's padded size
        assert model[0].wte.shape[0] == model[-1].weight.shape[0] == vocab.rows
        embed, loss = lay.stages.embed_place[0], lay.stages.loss_place[0]
        assert lay.ranks[embed].embedding_rows == (0, vocab.rows) and lay.ranks[loss].output_rows == (0, vocab.rows)
        assert all(r.embedding_rows == (0, 0) for r in lay.ranks if r.pp_rank != embed)


def test_stage_layers_for_redis_baseline_and_vhalf() -> None:
    paper = {"model.num_layers": 32, "model.hidden_size": 3072, "model.num_heads": 24, "model.seq_len": 2048,
             "layout.pp": 8, "train.global_batch_size": 128}
    # redis: the artifact's k = 3 layers on the last stage at V = 64k; the rest spread, later stages first.
    redis = resolve_layout(_cfg(**paper, **{"method.name": "redis", "model.vocab_size": 65536}))
    assert redis.stage_layers == (4, 4, 4, 4, 4, 4, 5, 3)
    # baseline: an even split, the remainder on the later stages.
    base = resolve_layout(_cfg(**{**paper, "method.name": "baseline", "model.num_layers": 30,
                                  "model.vocab_size": 65536}))
    assert base.stage_layers == (3, 3, 4, 4, 4, 4, 4, 4)
    assert [r.first_layer for r in base.ranks] == [(sum(base.stage_layers[:s]),) for s in range(8)]
    # V-Half: 2p stages, rank r holds stage r (chunk 0) and 2p-1-r (chunk 1); loss and embedding on rank 0.
    vhalf = resolve_layout(_cfg(**{**paper, "method.name": "vocab-2", "schedule.name": "vhalf", "layout.pp": 4,
                                   "model.num_layers": 18, "model.vocab_size": 65536}))
    assert vhalf.stage_layers == (2, 2, 2, 2, 2, 2, 3, 3)
    assert [r.stages for r in vhalf.ranks] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert [r.layers for r in vhalf.ranks] == [(2, 3), (2, 3), (2, 2), (2, 2)]
    assert vhalf.ranks[0].loss and vhalf.ranks[0].position_embedding and not vhalf.ranks[1].loss
    assert vhalf.ranks[0].first_layer == (0, 15)
    explicit = resolve_layout(_cfg(**SMALL, **{"method.name": "redis", "layout.pp": 3, "model.num_layers": 6,
                                               "layout.layers_per_stage": "[1,3,2]"}))
    assert explicit.stage_layers == (1, 3, 2)


def test_rank_map_covers_every_rank_pipeline_fastest() -> None:
    lay = resolve_layout(_cfg(**{**SMALL, "layout.pp": 2, "layout.dp": 2}))
    assert [(c.rank, c.pp, c.dp) for c in lay.rank_map] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]


def test_the_planner_the_trainer_and_wandb_read_one_plan() -> None:
    cfg = _cfg(**CASES["vocab-2 pp3 V500 pad8"])
    plan = resolve(cfg)
    made = make_plan(cfg)
    assert made.schedule == plan.schedule == planned_schedule(cfg)
    summary = plan.summary()
    assert json.loads(json.dumps(summary)) == summary == plan_dict(made)["resolved"]
    assert summary["schedule_sha1"] == hashlib.sha1(plan.schedule_text().encode()).hexdigest()
    assert summary["padded_vocab_size"] == 504 and summary["vocab_rows_per_shard"] == 168
    assert summary["stage_layers"] == [2, 2, 3]
    logged = run_config(cfg, {"model": {}}, plan=plan)
    assert logged["plan"] == summary
    assert logged["derived"]["layers_per_stage"] == summary["stage_layers"]
    assert logged["derived"]["vocab_rows_per_stage"] == [{"input": 168, "output": 168}] * 3
