"""The interlaced baseline's aligned schedule and the cost model's inter-node tier (simulated, not timed)."""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO
from vptrain.config import register_configs
from vptrain.plan import make_plan
from vptrain.schedule import Action, PassCosts, PassKind, build_schedule, memory_profile, simulate, validate_schedule
from vptrain.schedule.costs import (
    ModelShape,
    collective_seconds,
    device_profile,
    overlapped_collective_bytes,
    pass_costs,
)
from vptrain.schedule.efficiency import A100_OVERLAP_S_PER_BYTE
from vptrain.schedule.network import pipeline_groups
from vptrain.validate import validate

K = PassKind


@pytest.mark.parametrize(("p", "m"), [(4, 16), (8, 32), (16, 64), (32, 64)])
def test_free_vocabulary_and_communication_reach_the_1f1b_ideal(p: int, m: int) -> None:
    """With S, T, IF, IB and every transfer and collective free, the synchronous steps cost
    nothing only if every rank reaches each of them at the same moment."""
    sim = simulate(build_schedule("interlaced", "1f1b", p, m), PassCosts.uniform(p, f=1.0, b=2.0))
    ideal = (m + p - 1) * 3.0
    assert sim.makespan <= 1.05 * ideal
    plain = simulate(build_schedule("baseline", "1f1b", p, m), PassCosts.uniform(p, f=1.0, b=2.0))
    assert sim.makespan <= 1.05 * plain.makespan


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7, 8])
def test_warmup_and_peak_in_flight(p: int) -> None:
    m = 4 * p
    s = build_schedule("interlaced", "1f1b", p, m)
    for r, row in enumerate(s.ranks):
        first_output = row.index(Action(K.S, 0))
        assert sum(1 for a in row[:first_output] if a.kind is K.F) == p - r
    peaks, _, _ = memory_profile(s)
    assert list(peaks) == [2 * (p - r) - 1 for r in range(p)]


@pytest.mark.parametrize("p", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("m_per_p", [1, 3])
def test_validator_accepts_every_size(p: int, m_per_p: int) -> None:
    for m in sorted({1, 2, m_per_p * p}):
        validate_schedule(build_schedule("interlaced", "1f1b", p, m))


def test_steps_line_up_with_vocabulary_and_communication_costs() -> None:
    """Every rank starts S(i) at one moment (the steps are synchronous), and with the vocabulary
    passes and collectives priced the makespan grows by about their sum per microbatch, not more."""
    p, m, s_cost, t_cost, coll = 8, 32, 0.1, 0.2, 0.01
    s = build_schedule("interlaced", "1f1b", p, m)
    costs = PassCosts.uniform(p, f=1.0, b=2.0, s=s_cost, t=t_cost, collective=coll)
    sim = simulate(s, costs)
    for i in range(m):
        assert len({sim.start[r][s.ranks[r].index(Action(K.S, i))] for r in range(p)}) == 1
    per_step = s_cost + t_cost + 5 * coll + 2 * coll  # output chain's 5 collectives, IF/IB's 2
    assert sim.makespan <= (m + p - 1) * 3.0 + m * per_step * 1.05 + 0.5


SHAPE = ModelShape(vocab=32768, vocab_rows=32768, layers=48, hidden=4096, seq=2048, micro_batch=1, act_bytes=2)


def test_a_collective_across_nodes_costs_more_than_within_one() -> None:
    one_node = device_profile("a100")  # 8 per node
    two_nodes = device_profile("a100", devices_per_node=4)
    for kind in (K.X_BCAST, K.DX_REDUCE, K.MAX):
        inside = collective_seconds(SHAPE, kind, 8, one_node)
        across = collective_seconds(SHAPE, kind, 8, two_nodes)
        assert across > inside, kind
    # The bandwidth term is the inter-node tier's: about 100/25 = 4x for a large payload.
    big = collective_seconds(SHAPE, K.DX_REDUCE, 8, two_nodes) / collective_seconds(SHAPE, K.DX_REDUCE, 8, one_node)
    assert 3.0 < big < 4.5
    # A pipeline of 16 on 8-GPU nodes crosses nodes; the p2p cost is its slowest hop's.
    layers = [(3,)] * 16
    inside = pass_costs(SHAPE, method="vocab-1", p=16, chunk_layers=layers, loss_place=(15, 0), precision="bf16",
                        device=device_profile("a100", devices_per_node=16))
    across = pass_costs(SHAPE, method="vocab-1", p=16, chunk_layers=layers, loss_place=(15, 0), precision="bf16",
                        device=device_profile("a100"))
    assert across.p2p > 3 * inside.p2p
    assert across.collective[K.X_BCAST] > 3 * inside.collective[K.X_BCAST]


def test_node_follows_the_rank_map() -> None:
    net = device_profile("a100").network
    groups = pipeline_groups(4, dp=4)  # pp=4 dp=4 on 8-GPU nodes: every pipeline inside one node
    assert all(len({net.node(r) for r in g}) == 1 for g in groups)
    assert {net.node(r) for r in pipeline_groups(16)[0]} == {0, 1}
    assert device_profile("cpu").network.node(1000) == 0  # cpu: one node
    with pytest.raises(ValueError, match="cluster.gpus_per_node"):
        device_profile("a100", devices_per_node=-1)


def _mfu(experiment: str, method: str) -> float:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"experiment={experiment}", f"method={method}",
                                            "model.vocab_size=32768", "train.global_batch_size=64"])
    dcfg.run_dir = "/tmp/unused"
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    return make_plan(cfg).mfu


def test_the_overlapped_methods_pay_the_measured_overlap_cost(monkeypatch) -> None:
    """vocab-naive/1/2's F and B stretch by the profile's cost per byte of their side-stream
    collectives, interlaced's (blocking) and the baseline's do not, the A100 constant is the one the
    artifact's per-pass times give, and charged per byte it weighs less on a stage with more layers."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import calibrate

    per_byte, low, high, fraction = calibrate.fit_overlap_cost()
    sys.modules.pop("calibrate", None)
    assert per_byte == pytest.approx(A100_OVERLAP_S_PER_BYTE, rel=0.01) and 0.0 < low <= per_byte <= high
    assert 0.02 < fraction < 0.05  # the artifact: 3.2 % of F + B
    a100 = device_profile("a100")

    def busy(method: str, p: int, rank: int) -> float:
        c = pass_costs(SHAPE, method=method, p=p, chunk_layers=[(48 // p,)] * p, loss_place=(p - 1, 0),
                       precision="bf16", device=a100)
        return sum(c.compute[rank][(kind, 0)] - a100.pass_overhead_s for kind in (K.F, K.B))

    for method in ("vocab-1", "vocab-2", "vocab-naive"):
        extra = A100_OVERLAP_S_PER_BYTE * overlapped_collective_bytes(SHAPE, method, 8)
        assert extra > 0
        for rank in (0, 3, 7):
            assert busy(method, 8, rank) - busy("interlaced", 8, rank) == pytest.approx(extra, rel=1e-9)
    for method in ("interlaced", "baseline", "redis"):
        assert overlapped_collective_bytes(SHAPE, method, 8) == 0.0
    share = {p: busy("vocab-1", p, 0) / busy("interlaced", p, 0) - 1 for p in (2, 8)}
    assert 0 < share[2] < share[8] / 3  # 24 layers per collective against 6
    assert device_profile("cpu").overlap_s_per_byte == 0.0


def test_interlaced_leads_on_one_node_and_trails_across_nodes() -> None:
    """The paper's trend (vp_algorithms §5; v1 Table 5 and the VP artifact): interlaced slightly ahead
    of both overlapped methods at 8 GPUs on one node (its passes run alone, theirs share the device
    with side-stream collectives), behind the better of them at 16 and 32 GPUs, where its blocking
    collectives and step-aligned transfers cross InfiniBand. (The paper has it further behind at 32
    than at 16; the model's two gaps are close, docs/BENCHMARKS.md, so that is not asserted.)"""
    register_configs()
    gaps = []
    for experiment in ("paper-1f1b-8gpu", "paper-1f1b-16gpu", "paper-1f1b-32gpu"):
        mfu = {m: _mfu(experiment, m) for m in ("interlaced", "vocab-1", "vocab-2")}
        gaps.append(mfu["interlaced"] - max(mfu["vocab-1"], mfu["vocab-2"]))
    assert 0.0 < gaps[0] < 0.02, gaps  # ahead on one node, by less than 2 points ("slightly")
    assert gaps[1] < -0.005 and gaps[2] < -0.005, gaps  # two and four nodes: behind by over half a point
