"""schedule=interleaved (Megatron's interleaved 1F1B, v chunks per rank, rank r holds stages r, r+p,
...): valid and deadlock-free for baseline and every vocabulary method, in rounds of p microbatches,
refused with a clear error where m is not a multiple of p, planned by `vptrain plan`. Training it
(engine/interleaved_engine.py) equals the single-process model: tests/distributed/test_vocab_engine.py."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import validated_config

from vptrain.plan import make_plan
from vptrain.resolved import resolve
from vptrain.schedule import Action, PassCosts, PassKind, build_schedule, memory_profile, simulate, validate_schedule
from vptrain.schedule.builders import interleaved_order

K = PassKind
METHODS = ("baseline", "vocab-naive", "vocab-1", "vocab-2")


def test_megatron_order_on_a_small_pipeline() -> None:
    """p=2, m=4, v=2, rank 0: 2(p-1) + (v-1)p = 4 forwards of warm-up, rounds of p microbatches
    through chunk 0 then chunk 1; backwards in the same rounds with the chunks reversed."""
    order = [(a.kind.value, a.microbatch, a.chunk) for a in interleaved_order(2, 4, 2, 0)]
    assert order[:4] == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1)]
    assert order[4:8] == [("F", 2, 0), ("B", 0, 1), ("F", 3, 0), ("B", 1, 1)]
    assert [x for x in order if x[0] == "B"] == [("B", 0, 1), ("B", 1, 1), ("B", 0, 0), ("B", 1, 0),
                                                  ("B", 2, 1), ("B", 3, 1), ("B", 2, 0), ("B", 3, 0)]


@pytest.mark.parametrize("method", METHODS)
def test_valid_and_deadlock_free_over_a_grid(method: str) -> None:
    for p, v in ((2, 2), (3, 2), (4, 2), (2, 3), (4, 4)):
        for m in (p, 2 * p, 4 * p):
            s = build_schedule(method, "interleaved", p, m, chunks=v)
            assert s.chunks == v
            validate_schedule(s)
            costs = PassCosts.uniform(p, v, f=1, b=2, s=0.3, t=0.3, input_f=0.1, input_b=0.1)
            assert simulate(s, costs).makespan > 0
            for r, row in enumerate(s.ranks):
                computes = {(a.kind, a.microbatch, a.chunk) for a in row if a.kind in (K.F, K.B)}
                assert computes == {(k, i, c) for k in (K.F, K.B) for i in range(m) for c in range(v)}, r


@pytest.mark.parametrize("method", METHODS)
def test_smaller_bubble_than_1f1b_at_equal_work(method: str) -> None:
    """Uniform costs, a chunk being 1/v of a stage: the bubble shrinks (Narayanan et al.: by about v)."""
    p, m, v = 4, 16, 2
    inter = simulate(build_schedule(method, "interleaved", p, m, chunks=v),
                     PassCosts.uniform(p, v, f=1, b=2, s=0.3, t=0.3, input_f=0.1, input_b=0.1))
    plain = simulate(build_schedule(method, "1f1b", p, m),
                     PassCosts.uniform(p, 1, f=v, b=2 * v, s=0.3, t=0.3, input_f=0.1, input_b=0.1))
    assert inter.bubble_rate < 0.75 * plain.bubble_rate


def test_m_not_a_multiple_of_p_is_refused() -> None:
    with pytest.raises(ValueError, match="m=6: schedule=interleaved runs rounds of p=4"):
        build_schedule("vocab-2", "interleaved", 4, 6)
    with pytest.raises(ValueError, match="train.global_batch_size.*rounds of layout.pp=4.*use 8"):
        validated_config(**{"schedule.name": "interleaved", "layout.pp": 4, "model.num_layers": 8,
                            "train.global_batch_size": 6})
    with pytest.raises(ValueError, match="schedule.virtual_stages"):
        validated_config(**{"schedule.name": "interleaved", "schedule.virtual_stages": 1, "layout.pp": 2})
    with pytest.raises(ValueError, match="model.num_layers.*3 \\* layout.pp"):
        validated_config(**{"schedule.name": "interleaved", "schedule.virtual_stages": 3, "layout.pp": 2,
                            "model.num_layers": 4, "train.global_batch_size": 4})


def test_plan_names_each_ranks_stages() -> None:
    cfg = validated_config(**{"schedule.name": "interleaved", "schedule.virtual_stages": 3, "layout.pp": 2,
                              "model.num_layers": 6, "train.global_batch_size": 4, "method.name": "vocab-1"})
    text = resolve(cfg).schedule_text()
    assert "# rank 0: stages 0, 2, 4\n" in text and "# rank 1: stages 1, 3, 5\n" in text
    plan = make_plan(cfg)
    assert [s.peak_in_flight > 0 for s in plan.stages] == [True, True]


GOAL = {"model.num_layers": 8, "model.hidden_size": 256, "model.seq_len": 256, "model.vocab_size": 32768,
        "layout.pp": 4, "train.global_batch_size": 16, "method.name": "vocab-2"}


def test_goal_interleaved_bubble_at_most_0_7_of_1f1b() -> None:
    """Issue 13's goal at p=4, m=16 (v=2, vocab-2, cpu profile): measured 0.69x."""
    inter = make_plan(validated_config(**GOAL, **{"schedule.name": "interleaved"}))
    plain = make_plan(validated_config(**GOAL, **{"schedule.name": "1f1b"}))
    assert inter.sim.bubble_rate <= 0.7 * plain.sim.bubble_rate


def test_memory_grows_with_the_warm_up() -> None:
    """The price: rank 0 keeps 2(p-1) + (v-1)p + 1 chunks (+ the vocabulary methods' extra) alive."""
    p, m, v = 4, 16, 2
    for method, extra in (("baseline", 0), ("vocab-2", 1), ("vocab-1", 2)):
        peaks, _, _ = memory_profile(build_schedule(method, "interleaved", p, m, chunks=v))
        assert peaks[0] == 2 * (p - 1) + (v - 1) * p + 1 + extra
        assert peaks == sorted(peaks, reverse=True)


def test_action_of_another_chunk_count_is_rejected() -> None:
    s = build_schedule("baseline", "interleaved", 2, 4, chunks=2)
    row = list(s.ranks[0]) + [Action(K.F, 0, 2)]
    with pytest.raises(Exception, match="F0.2"):
        validate_schedule(dataclasses.replace(s, ranks=(tuple(row), s.ranks[1])))
