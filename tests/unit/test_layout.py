"""Layers per stage, vocabulary rows per rank, the rank map, and the cost model behind redis."""

from __future__ import annotations

import pytest

from vptrain.config import RunConfig
from vptrain.layout import balance_layers, even_split, rank_layouts, rank_map, stage_layers
from vptrain.schedule.costs import (
    ModelShape,
    device_profile,
    layer_flops,
    output_flops,
    pass_flops,
    vocab_layer_units,
)
from vptrain.schedule.ir import PassKind

K = PassKind


def paper_cfg(method: str = "baseline", vocab: int = 262144, pp: int = 8, schedule: str = "1f1b") -> RunConfig:
    """The paper's 8-GPU model (Table 1): 32 layers, h 3072, s 2048."""
    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 32, 3072, 24
    cfg.model.seq_len, cfg.model.vocab_size = 2048, vocab
    cfg.layout.pp, cfg.method.name, cfg.schedule.name = pp, method, schedule
    return cfg


def test_compute_ratio_matches_the_paper() -> None:
    """Output layer / transformer layer = V / (12h + 2s): 6.25 at V=256k, h=3072, s=2048 (vp_algorithms §1.2)."""
    shape = ModelShape(vocab=262144, vocab_rows=262144, layers=32, hidden=3072, seq=2048, micro_batch=1, act_bytes=2)
    ratio = 6 * shape.tokens * shape.hidden * shape.vocab_rows / layer_flops(shape)
    assert ratio == pytest.approx(262144 / (12 * 3072 + 2 * 2048))
    assert ratio == pytest.approx(6.4, abs=0.01)
    _, out_units = vocab_layer_units(shape)
    assert out_units == pytest.approx(ratio, rel=1e-3)  # plus the loss's few elementwise FLOPs
    assert output_flops(shape, 1) > 0


@pytest.mark.parametrize("vocab,last", [(32768, 4), (65536, 3), (262144, 0)])
def test_redis_moves_layers_off_the_last_stage(vocab: int, last: int) -> None:
    """The artifact's choices for the 8-GPU, 32-layer model: k = 4 / 3 / 0 at V = 32k / 64k / 256k."""
    layers = stage_layers(paper_cfg("redis", vocab))
    assert sum(layers) == 32
    assert layers[-1] == last
    assert layers == sorted(layers[:-1]) + [last]  # the remainder sits on the later stages


def test_redis_balances_better_than_the_even_split() -> None:
    cfg = paper_cfg("redis", 131072)
    _, out_units = vocab_layer_units(ModelShape(131072, 131072, 32, 3072, 2048, 1, 2))
    redis = stage_layers(cfg)
    even = even_split(32, 8)
    worst = lambda layers: max(n + (out_units if s == 7 else 0) for s, n in enumerate(layers))  # noqa: E731
    assert worst(redis) < worst(even)


def test_explicit_layers_win_and_even_split_puts_the_remainder_last() -> None:
    cfg = paper_cfg("redis")
    cfg.layout.layers_per_stage = [5, 5, 5, 5, 4, 4, 4, 0]
    assert stage_layers(cfg) == [5, 5, 5, 5, 4, 4, 4, 0]
    assert even_split(10, 4) == [2, 2, 3, 3]
    assert stage_layers(paper_cfg("vocab-2", pp=6)) == [5, 5, 5, 5, 6, 6]
    assert stage_layers(paper_cfg("vocab-2", pp=8, schedule="vhalf")) == [2] * 16


def test_balance_keeps_middle_stages_non_empty() -> None:
    assert balance_layers(4, [0.0, 0.0, 0.0, 50.0]) in ([1, 1, 2, 0], [2, 1, 1, 0])
    assert all(n >= 1 for n in balance_layers(4, [0.0, 0.0, 0.0, 50.0])[1:-1])


def test_rank_map_pipeline_index_varies_fastest() -> None:
    cfg = paper_cfg()
    cfg.layout.pp, cfg.layout.dp = 4, 2
    coords = rank_map(cfg)
    assert [(c.rank, c.pp, c.dp) for c in coords[:5]] == [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 0, 1)]


def test_vocab_methods_shard_both_tables_evenly() -> None:
    layouts = rank_layouts(paper_cfg("vocab-1", vocab=262144))
    rows = [lay.output_rows for lay in layouts]
    assert rows[0] == (0, 32768) and rows[-1] == (229376, 262144)
    assert all(lay.embedding_rows == lay.output_rows for lay in layouts)
    assert [lay.loss for lay in layouts] == [False] * 7 + [True]


def test_baseline_keeps_whole_tables_on_the_edges() -> None:
    layouts = rank_layouts(paper_cfg("baseline", vocab=1000, pp=4))
    assert layouts[0].embedding_rows == (0, 1000) and layouts[0].output_rows == (0, 0)
    assert layouts[3].output_rows == (0, 1000) and layouts[3].final_norm
    vhalf = rank_layouts(paper_cfg("baseline", vocab=1000, pp=4, schedule="vhalf"))
    assert vhalf[0].stages == (0, 7) and vhalf[0].loss and vhalf[0].position_embedding
    assert vhalf[0].output_rows == (0, 1000) and vhalf[3].stages == (3, 4)


def test_vocab_passes_split_the_output_layer_as_the_algorithms_do() -> None:
    shape = ModelShape(vocab=4096, vocab_rows=4096, layers=4, hidden=1024, seq=32, micro_batch=1, act_bytes=4)
    gemm = shape.tokens * shape.hidden * 4096 / 4
    for method, s_share in (("vocab-1", 2), ("vocab-naive", 2), ("vocab-2", 4)):
        table = pass_flops(shape, method=method, p=4, chunk_layers=[(1,)] * 4, loss_place=(3, 0))[0]
        assert table[(K.S, 0)] == pytest.approx(s_share * gemm, rel=0.01)
        assert table[(K.S, 0)] + table[(K.T, 0)] == pytest.approx(6 * gemm, rel=0.01)
    base = pass_flops(shape, method="baseline", p=4, chunk_layers=[(1,)] * 4, loss_place=(3, 0))
    assert base[3][(K.F, 0)] > base[1][(K.F, 0)] and (K.S, 0) not in base[3]


def test_device_profiles() -> None:
    assert device_profile("a100").peak_flops["bf16"] == 312e12
    assert device_profile("h100").peak_flops["bf16"] == 989e12
    with pytest.raises(ValueError, match="cluster.profile"):
        device_profile("tpu")
