"""The strict runtime checker of the communication order (train.strict_comm_order) in real gloo runs.

Every method's schedule trains through with the checker on, executing exactly schedule.txt; a
schedule with two shared operations of one rank the other way round (fed to the engine past the
validator) makes every rank of the pipeline fail at once with the ranks and operations named,
where gloo alone trains through it and NCCL would hang. One group of 4 CPU processes runs every
case (see _strict_cases.py and _matrix_group.py).
"""

from __future__ import annotations

import json

import pytest
from _engine_matrix import make_config
from _matrix_group import Matrix, run_matrix
from unit._mutants import swappable_pairs

from vptrain.plan import planned_schedule
from vptrain.schedule import Action, PassKind, build_schedule

pytestmark = pytest.mark.distributed

K = PassKind
SGD = {"optim.name": "sgd", "optim.lr": 0.1, "optim.min_lr": 0.1, "optim.warmup_steps": 0, "optim.decay": "constant"}


def case(method: str, schedule: str, pp: int, m: int, *, dp: int = 1, strict: bool = True, mutant=None) -> dict:
    overrides = {
        "method.name": method, "schedule.name": schedule, "layout.pp": pp, "layout.dp": dp,
        "model.vocab_size": 256, "model.num_layers": 2 * pp, "model.seq_len": 8, "model.hidden_size": 32,
        "model.num_heads": 2, "train.global_batch_size": m * dp, "train.micro_batch_size": 1, "train.steps": 2,
        "train.checkpoint_at_end": False, "train.record_passes": True, "train.strict_comm_order": strict,
        "train.collective_timeout_s": 60, **SGD,
    }
    name = f"{method}-{schedule}-pp{pp}-dp{dp}-m{m}" + ("" if strict else "-lenient") + ("-mutant" if mutant else "")
    return {"name": name, "overrides": overrides, "mutant": mutant}


def _reported_swap() -> dict:
    """The order the old lowering produced on vocab-2 1F1B p=2: rank 0 ran IF3 EMB_REDUCE3 before
    SEND_F0 while rank 1 ran RECV_F0 before EMB_REDUCE3."""
    row = build_schedule("vocab-2", "1f1b", 2, 4).ranks[0]
    send, reduce_ = row.index(Action(K.SEND_F, 0)), row.index(Action(K.EMB_REDUCE, 3))
    assert row[send + 1 : reduce_ + 1] == (Action(K.IF, 3), Action(K.EMB_REDUCE, 3))
    return {"rank": 0, "moves": [[send, send + 1], [send + 1, reduce_]]}


def _sampled_swap(method: str, schedule: str, p: int, m: int, rank: int, kinds: str) -> dict:
    """A swappable pair of rank's communication actions: two collectives, or a transfer and a collective."""
    s = build_schedule(method, schedule, p, m)
    row = s.ranks[rank]
    for i, j in swappable_pairs(s, rank):
        collectives = row[i].kind.is_collective + row[j].kind.is_collective
        if collectives == (2 if kinds == "collectives" else 1):
            return {"rank": rank, "moves": [[i, j]]}
    raise AssertionError(f"no {kinds} pair to swap on rank {rank}")


PASSING = [
    case("vocab-2", "1f1b", 2, 3, dp=2),  # two pipelines: two vocabulary groups, one store
    case("vocab-2", "1f1b", 3, 4),
    case("vocab-1", "1f1b", 2, 3),
    case("vocab-1", "1f1b", 3, 4),
    case("vocab-2", "vhalf", 2, 4),
    case("vocab-2", "vhalf", 3, 6),
    case("vocab-1", "vhalf", 2, 4),
    case("vocab-1", "vhalf", 3, 6),
    case("vocab-naive", "1f1b", 4, 4),
    case("interlaced", "1f1b", 3, 4),
    case("baseline", "vhalf", 2, 4),  # transfers only
    # ZB-H1: W is local (no transfer, no collective); B's SEND_B goes at once.
    case("vocab-2", "zb-h1", 2, 3),
    case("vocab-1", "zb-h1", 3, 4),
    case("baseline", "zb-h1", 3, 4),
    case("vocab-2", "interleaved", 3, 3),  # every chunk hand-off crosses ranks, rank 2 -> rank 0 too
    case("vocab-1", "interleaved", 2, 4),
]
SWAPPED_TRANSFER = case("vocab-2", "1f1b", 2, 4, mutant=_reported_swap())
GLOO_TOLERATES = case("vocab-2", "1f1b", 2, 4, strict=False, mutant=_reported_swap())
SWAPPED_COLLECTIVES = case("vocab-1", "vhalf", 3, 6, mutant=_sampled_swap("vocab-1", "vhalf", 3, 6, 1, "collectives"))
MIDDLE_RANK = case("vocab-2", "1f1b", 3, 4, mutant=_sampled_swap("vocab-2", "1f1b", 3, 4, 1, "transfer"))
CASES = [*PASSING, SWAPPED_TRANSFER, GLOO_TOLERATES, SWAPPED_COLLECTIVES, MIDDLE_RANK]


MATRIX = Matrix("strict", CASES, timeout_s=900)


@pytest.fixture(scope="module")
def runs(request):
    runs = run_matrix(request, MATRIX)
    assert all(code == 0 for code in runs.returncodes), "\n".join(log[-3000:] for log in runs.logs)
    return runs


def _outcome(runs, spec: dict) -> tuple[dict[int, dict], dict[int, str]]:
    case_dir = runs[spec["name"]]
    o = spec["overrides"]
    world = o["layout.pp"] * o["layout.dp"]
    results = {r: json.loads(p.read_text()) for r in range(world) if (p := case_dir / f"result_rank{r}.json").exists()}
    errors = {r: p.read_text() for r in range(world) if (p := case_dir / f"error_rank{r}.txt").exists()}
    return results, errors


@pytest.mark.parametrize("spec", PASSING, ids=[c["name"] for c in PASSING])
def test_every_schedule_runs_under_the_strict_checker_in_its_own_order(runs, spec):
    results, errors = _outcome(runs, spec)
    assert not errors, next(iter(errors.values()))[-3000:]
    o = spec["overrides"]
    sched = planned_schedule(make_config(o, str(runs[spec["name"]])))  # what the trainer built
    for rank, result in results.items():
        stage, dp = rank % o["layout.pp"], rank // o["layout.pp"]
        row = sched.ranks[stage]
        # Every transfer and every collective call was checked (a collective action makes >= 1 call).
        assert result["checked"] >= sum(not a.kind.is_compute for a in row) * o["train.steps"]
        passes = runs[spec["name"]] / "passes" / f"stage{stage}_dp{dp}.txt"
        executed = passes.read_text().splitlines()
        assert executed == [" ".join(map(str, row))] * o["train.steps"]  # schedule.txt is what ran


def test_gloo_alone_trains_through_the_reported_order_swap(runs):
    """Why the checker exists: without it the swapped schedule runs to the end on gloo."""
    results, errors = _outcome(runs, GLOO_TOLERATES)
    assert not errors and len(results) == 2


def test_the_reported_order_swap_fails_loudly_on_both_ranks(runs):
    results, errors = _outcome(runs, SWAPPED_TRANSFER)
    assert not results and sorted(errors) == [0, 1]
    for text in errors.values():
        assert "CommOrderError: ranks" in text and "issue the operations they share in different orders" in text
        assert "EMB_REDUCE3" in text and ("SEND_F0" in text or "RECV_F0" in text)


@pytest.mark.parametrize("spec", [SWAPPED_COLLECTIVES, MIDDLE_RANK], ids=["collectives-vhalf-pp3", "transfer-1f1b-pp3"])
def test_a_swap_fails_every_rank_of_the_pipeline_at_once(runs, spec):
    results, errors = _outcome(runs, spec)
    assert not results and sorted(errors) == [0, 1, 2]
    mutated = spec["mutant"]["rank"]
    found = [text for text in errors.values() if "issue the operations they share in different orders" in text]
    assert found and all(f"rank {mutated}" in text for text in found)
    # The others stop at their next check, named after the rank that found the swap.
    for text in errors.values():
        assert "CommOrderError" in text and "waited" not in text  # nobody ran into the timeout
