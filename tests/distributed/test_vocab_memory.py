"""The vocabulary bytes a real step holds match the plan's prediction (DESIGN.md invariant 7).

One group of 4 CPU processes runs every case (see _memory_matrix.py and _matrix_group.py): each
vocabulary method on 1F1B at pp 2, 3, 4, V-Half at pp 2 and 4, without the stored softmax, in bf16
and with dp 2. Between every two actions each rank measures the bytes of the storages its engine's
state reaches; the plan predicts them from the schedule and the buffer sizes
(vptrain/schedule/memory.py). The prediction models every buffer the engine allocates, so the only
slack is the issue's 10%.
"""

from __future__ import annotations

import json

import pytest
from _matrix_group import Matrix, run_matrix

pytestmark = pytest.mark.distributed

TOLERANCE = 0.10  # of the rank's predicted peak
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.min_lr": 0.5, "optim.warmup_steps": 0, "optim.decay": "constant"}


def case(method: str, pp: int, m: int, *, dp: int = 1, vocab: int = 500, layers: int = 4, **extra) -> dict:
    overrides = {
        "method.name": method, "layout.pp": pp, "layout.dp": dp, "model.vocab_size": vocab,
        "model.num_layers": layers, "model.seq_len": 16, "train.global_batch_size": m * dp,
        "train.micro_batch_size": 1, "train.steps": 1, "train.checkpoint_at_end": False, **SGD, **extra,
    }
    name = f"{method}-pp{pp}-dp{dp}-m{m}-V{vocab}" + "".join(
        f"-{v}" if k == "schedule.name" else f"-{k.split('.')[-1]}{v}" for k, v in extra.items())
    return {"name": name, "overrides": overrides}


METHODS = ["interlaced", "vocab-naive", "vocab-1", "vocab-2"]
VHALF = {"schedule.name": "vhalf"}
CASES = [
    *[case(method, pp, 2 * pp + 1, vocab=vocab, layers=layers)
      for method in METHODS for pp, vocab, layers in ((2, 509, 4), (3, 500, 6), (4, 512, 4))],
    case("vocab-naive", 2, 5, **VHALF),
    case("vocab-1", 2, 5, vocab=509, **VHALF),
    case("vocab-2", 2, 4, **VHALF),
    case("vocab-2", 4, 8, layers=8, **VHALF),
    case("vocab-1", 2, 5, **{"vocab.store_softmax": False}),
    case("vocab-2", 3, 7, layers=6, **{"precision": "bf16"}),
    case("vocab-1", 2, 3, dp=2),
]


MATRIX = Matrix("memory", CASES, timeout_s=600)


@pytest.fixture(scope="module")
def measured(request):
    return run_matrix(request, MATRIX)


def _ranks(measured, spec) -> list[dict]:
    case_dir = measured.clean(spec["name"])
    o = spec["overrides"]
    return [json.loads((case_dir / f"rank{r}.json").read_text()) for r in range(o["layout.pp"] * o["layout.dp"])]


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_measured_vocab_memory_matches_the_plan(measured, spec):
    for rank, got in enumerate(_ranks(measured, spec)):
        assert got["executed"] == got["actions"], f"rank {rank} did not run the planned schedule"
        after = dict(got["measured"])  # position of the last action run -> bytes held
        assert sorted(after) == list(range(-1, len(got["actions"]))), "the probe missed an action"
        held = [after[n] for n in range(len(got["actions"]))]
        predicted = got["live"]
        peak = max(predicted)
        assert got["plan_vocab_bytes"] == peak, "the plan's vocab column is not the simulated peak"
        assert abs(max(held) - peak) <= TOLERANCE * peak, f"rank {rank}: peak {max(held)} B, predicted {peak} B"
        worst = max(range(len(held)), key=lambda n: abs(held[n] - predicted[n]))
        assert abs(held[worst] - predicted[worst]) <= TOLERANCE * peak, (
            f"rank {rank} after {got['actions'][worst]} (position {worst}): holds {held[worst]} B, "
            f"predicted {predicted[worst]} B")
        assert held[-1] == 0, f"rank {rank} still holds {held[-1]} B of vocabulary buffers at the optimizer step"
