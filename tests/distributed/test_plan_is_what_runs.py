"""DESIGN.md invariant 8: the pass order every rank executes is its line of the `schedule.txt` that
`vptrain plan` writes for the same config (V-Half, a padded vocabulary, two pipelines, ZB-H1's W passes).

The runs join the session's group of spawned CPU processes (_matrix_group.py); the vocab-2 1F1B
default job is held to its plan end to end through the CLI in test_run_outputs.py.
"""

from __future__ import annotations

import pytest
from _engine_matrix import make_config
from _matrix_group import Matrix, run_matrix

from vptrain.plan import run_plan
from vptrain.schedule import parse_schedule

pytestmark = pytest.mark.distributed

SGD = {"optim.name": "sgd", "optim.lr": 0.1, "optim.min_lr": 0.1, "optim.warmup_steps": 0, "optim.decay": "constant"}


def case(method: str, schedule: str, pp: int, m: int, *, dp: int = 1, vocab: int = 256) -> dict:
    overrides = {
        "method.name": method, "schedule.name": schedule, "layout.pp": pp, "layout.dp": dp,
        "model.vocab_size": vocab, "model.num_layers": 2 * pp, "model.seq_len": 8, "model.hidden_size": 32,
        "model.num_heads": 2, "train.global_batch_size": m * dp, "train.micro_batch_size": 1, "train.steps": 2,
        "train.checkpoint_at_end": False, "train.record_passes": True, "train.strict_comm_order": False, **SGD,
    }
    return {"name": f"plan-{method}-{schedule}-pp{pp}-dp{dp}-m{m}-V{vocab}", "overrides": overrides, "mutant": None}


CASES = [
    case("vocab-2", "vhalf", 2, 4, dp=2, vocab=253),  # two pipelines; 253 rows padded to 254
    case("vocab-1", "1f1b", 3, 4, vocab=250),  # three shards of 84 rows, the last partly padding
    case("redis", "zb-h1", 2, 3),  # the plain method on our engine, W passes included
]
MATRIX = Matrix("strict", CASES, timeout_s=300)


@pytest.fixture(scope="module")
def runs(request):
    runs = run_matrix(request, MATRIX)
    assert all(code == 0 for code in runs.returncodes), "\n".join(log[-3000:] for log in runs.logs)
    return runs


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_every_rank_executes_its_line_of_the_plans_schedule_txt(runs, spec, tmp_path):
    case_dir = runs.clean(spec["name"])
    o = spec["overrides"]
    assert run_plan(make_config(o, str(tmp_path))) == 0  # what `vptrain plan` runs once Hydra composed
    planned = parse_schedule((tmp_path / "schedule.txt").read_text())
    assert (planned.method, planned.name, planned.p) == (o["method.name"], o["schedule.name"], o["layout.pp"])
    for rank in range(o["layout.pp"] * o["layout.dp"]):
        stage, dp = rank % o["layout.pp"], rank // o["layout.pp"]
        executed = (case_dir / "passes" / f"stage{stage}_dp{dp}.txt").read_text().splitlines()
        assert executed == [" ".join(map(str, planned.ranks[stage]))] * o["train.steps"], f"rank {rank}"
