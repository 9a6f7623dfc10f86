"""The activation bytes a real step keeps alive match the plan's per-rank figure (issue 13 §3).

Each case trains one step on CPU ranks with an ActivationMeter around it (vptrain/engine/
activation_meter.py): every tensor autograd saves for backward, by storage, weights left out, plus
the tensors DeepSpeed's pipeline holds for its backwards (received inputs, chunk outputs). The plan
predicts the rank's peak as `memory["activations"]` (simulate.memory_profile weighted by
schedule/activations.py). The cases run in the "memory" group of _memory_matrix.py, beside
test_vocab_memory.py's, in the same spawned processes.
"""

from __future__ import annotations

import json

import pytest
from _matrix_group import Matrix, run_matrix

from vptrain.schedule.rules import StageMap

pytestmark = pytest.mark.distributed

TOLERANCE = 0.10  # the issue's: of the plan's figure for the rank
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.min_lr": 0.5, "optim.warmup_steps": 0, "optim.decay": "constant"}
H, HEADS, SEQ, MB = 64, 4, 16, 1  # the config's default width and heads; seq and microbatch as set below


def case(method: str, schedule: str, m: int, *, layers: int = 4) -> dict:
    overrides = {
        "method.name": method, "schedule.name": schedule, "layout.pp": 2, "model.vocab_size": 500,
        "model.num_layers": layers, "model.hidden_size": H, "model.num_heads": HEADS, "model.seq_len": SEQ,
        "train.global_batch_size": m, "train.micro_batch_size": MB, "train.steps": 1,
        "train.checkpoint_at_end": False, **SGD,
    }
    return {"name": f"activations-{schedule}-{method}-m{m}-L{layers}", "overrides": overrides}


CASES = [
    case("baseline", "1f1b", 5),
    case("vocab-1", "1f1b", 5),
    case("vocab-2", "1f1b", 4, layers=6),
    case("vocab-2", "1f1b", 4, layers=2),  # one layer per stage: the pipeline's own copies weigh the most
    case("baseline", "zb-h1", 5),  # split backward: activations live from F to W
    case("vocab-2", "zb-h1", 4),
    case("baseline", "vhalf", 4),
    case("vocab-2", "vhalf", 4),
    case("baseline", "interleaved", 4),  # two chunks per rank in a loop, B whole
    case("vocab-2", "interleaved", 4),
]

MATRIX = Matrix("memory", CASES, timeout_s=300)


@pytest.fixture(scope="module")
def measured(request):
    return run_matrix(request, MATRIX)


def _ranks(measured, spec) -> list[dict]:
    case_dir = measured.clean(spec["name"])
    return [json.loads((case_dir / f"rank{r}.json").read_text()) for r in range(spec["overrides"]["layout.pp"])]


def unplanned_bytes(spec: dict, rank: int, got: dict) -> float:
    """What the rank may keep beyond the plan's figure, from the model's shapes (not fitted): per
    in-flight microbatch-chunk, the fp32 per-token statistics the plan leaves out (each layer's two
    norms' mean and rstd, attention's log-sum-exp per head), baseline's first chunk's token ids (the
    plan counts DeepSpeed's copy of a hidden-state input, activations.pipeline_copies_bytes), and on
    the loss chunk the final norm's statistics, plus, on baseline's last
    stage, the previous microbatch's output that DeepSpeed keeps until it reuses the buffer; and the
    received inputs whose forward has not started (interleaved receives up to two ahead)."""
    o = spec["overrides"]
    tokens, f32, act = o["train.micro_batch_size"] * o["model.seq_len"], 4, 4
    hidden = tokens * o["model.hidden_size"] * act
    baseline = o["method.name"] in ("baseline", "redis")
    loss_chunk = StageMap(o["layout.pp"], o["schedule.name"], o.get("schedule.virtual_stages", 0)).loss_place
    worst = 0.0
    for chunk, layers in enumerate(got["plan_layers"]):
        extra = layers * tokens * (4 + o["model.num_heads"]) * f32
        extra += tokens * 8 if baseline and (rank, chunk) == (0, 0) else 0
        if (rank, chunk) == loss_chunk:
            extra += tokens * 2 * f32 + (hidden if baseline else 0)
        worst = max(worst, extra)
    return got["plan_in_flight"] * worst + _most_received_ahead(got["actions"]) * hidden


def _most_received_ahead(actions: list[str]) -> int:
    """The most inputs the rank holds received but not yet run through their chunk's forward."""
    waiting, most = set(), 0
    for action in actions:
        if action.startswith("RECV_F"):
            waiting.add(action.removeprefix("RECV_F"))
            most = max(most, len(waiting))
        elif action.startswith("F") and action[1:] in waiting:
            waiting.discard(action[1:])
    return most


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_measured_activations_are_the_plan_and_what_it_leaves_out(measured, spec):
    """measured <= plan + unplanned_bytes: nothing is kept beyond the plan and the listed buffers;
    on 1F1B also plan <= measured (everything the plan counts is kept); every graph is freed by the
    step's end."""
    for rank, got in enumerate(_ranks(measured, spec)):
        (step,) = got["activations"]
        plan, peak = got["plan_activation_bytes"], step["peak_bytes"]
        where = f"rank {rank}: peak {peak} B at {step['peak_at']} {step['peak_by_owner']}, plan {plan:.0f} B"
        assert step["live_bytes"] == step["held_bytes"], f"{where}; graphs keep {step['live_bytes']} B after the step"
        assert peak <= plan + unplanned_bytes(spec, rank, got), where
        if spec["overrides"]["schedule.name"] in ("1f1b", "interleaved"):  # B whole
            assert plan <= peak, where
        # On the split schedules the plan is up to 5% above what is measured (V-Half's rank 1:
        # 385024 B planned, 366592 B measured), not yet explained term by term; the 10%
        # bound (next test) holds on every rank.


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_measured_activations_within_ten_percent_of_the_plan(measured, spec):
    for rank, got in enumerate(_ranks(measured, spec)):
        (step,) = got["activations"]
        plan, peak = got["plan_activation_bytes"], step["peak_bytes"]
        assert abs(peak - plan) <= TOLERANCE * plan, (
            f"rank {rank}: peak {peak} B ({peak / plan:.3f}x the plan's {plan:.0f} B) at {step['peak_at']}: "
            f"{step['peak_by_owner']}")
