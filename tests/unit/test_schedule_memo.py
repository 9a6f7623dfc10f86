"""The search's schedule memo (vptrain/schedule/memo.py): a plan made with it is the plan made
without, and configs that build the same schedule share one build."""

from __future__ import annotations

from vptrain.config import RunConfig
from vptrain.plan import make_plan
from vptrain.schedule.memo import ScheduleMemo


def _config(method: str, *, layers: list[int] | None = None) -> RunConfig:
    cfg = RunConfig()
    cfg.method.name, cfg.layout.pp, cfg.train.global_batch_size = method, 4, 8
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = 8, 256, 4
    cfg.model.seq_len, cfg.model.vocab_size = 256, 8192
    cfg.layout.layers_per_stage = layers
    return cfg


def _same_plan(a, b) -> None:
    assert a.schedule == b.schedule
    assert a.sim == b.sim
    assert [st.memory for st in a.stages] == [st.memory for st in b.stages]
    assert a.mfu == b.mfu


def test_a_plan_made_with_the_memo_is_the_plan_made_without() -> None:
    memo = ScheduleMemo()
    for method in ("vocab-2", "vocab-1", "baseline"):
        _same_plan(make_plan(_config(method), memo=memo), make_plan(_config(method)))
    # Again from the memo (a hit): still the same plan, and the very same schedule object.
    first = make_plan(_config("vocab-2"), memo=memo)
    assert memo.hits == 1
    _same_plan(first, make_plan(_config("vocab-2")))
    assert make_plan(_config("vocab-2"), memo=memo).schedule is first.schedule


def test_a_different_schedule_is_built_anew() -> None:
    memo = ScheduleMemo()
    make_plan(_config("vocab-2"), memo=memo)
    other = make_plan(_config("vocab-1"), memo=memo)
    assert memo.hits == 0 and len(memo.built) == 2
    assert other.schedule.method == "vocab-1"
    # Redis's layer splits change the costs, not always the quantised nominal costs: whichever it
    # is, the plan equals the one made without the memo.
    for layers in ([2, 2, 2, 2], [3, 2, 2, 1], [2, 3, 3, 0]):
        _same_plan(make_plan(_config("redis", layers=layers), memo=memo), make_plan(_config("redis", layers=layers)))
