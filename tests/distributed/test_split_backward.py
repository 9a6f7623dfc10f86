"""Resume exactness on the split-backward schedules (ZB-H1, V-Half) and interleaved 1F1B: nothing of a step's B/W split
outlives the step, so a run that saves after step k and resumes in fresh trainers continues the
uninterrupted run bitwise (losses and parameters).

Each case trains in the session's group of spawned CPU processes (_matrix_group.py, kind "resume",
run_case below), in-process: an uninterrupted trainer for all steps, then one for the first k
steps that saves through vptrain.checkpoint, then a fresh one that loads it and trains the rest.
The equivalence of these schedules with the single-process model is in test_vocab_engine.py.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
from _matrix_group import Matrix, run_matrix

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT = 4, 2


def case(method: str, schedule: str, pp: int, m: int, **extra) -> dict:
    overrides = {
        "method.name": method, "schedule.name": schedule, "layout.pp": pp, "model.vocab_size": 256,
        "model.num_layers": 2 * pp, "model.seq_len": 8, "model.hidden_size": 32, "model.num_heads": 2,
        "train.global_batch_size": m, "train.micro_batch_size": 1, "train.steps": STEPS,
        "train.checkpoint_at_end": False, "optim.name": "adamw", "optim.lr": 1e-2, "optim.warmup_steps": 1,
        **extra,
    }
    name = f"resume-{method}-{schedule}-pp{pp}-m{m}" + "".join(f"-{k.split('.')[-1]}{v}" for k, v in extra.items())
    return {"name": name, "overrides": overrides}


CASES = [
    case("baseline", "zb-h1", 2, 3),
    case("vocab-2", "zb-h1", 3, 4, precision="bf16"),  # BF16_Optimizer's state, W's bf16 bracket
    case("vocab-1", "vhalf", 2, 4),
    # Interleaved runs B whole, but its chunk state (DualPipeV's per-chunk buffers and first-send
    # shapes) lives in the same engine and must not outlive a step either.
    case("vocab-2", "interleaved", 2, 4),
    case("baseline", "interleaved", 3, 3),
]
MATRIX = Matrix("resume", CASES, timeout_s=300)


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    """Rank r's result_rank{r}.json: the uninterrupted and the resumed losses, and whether its
    parameters ended bitwise equal."""
    import torch.distributed as dist
    from _engine_matrix import make_config

    from vptrain import checkpoint
    from vptrain.data import StepData
    from vptrain.resolved import resolve
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    run_dir = os.path.join(out_dir, f"case{index}")
    cfg = make_config(case["overrides"], run_dir)
    world = cfg.layout.pp * cfg.layout.dp
    if rank >= world:
        return
    validate(cfg)
    os.makedirs(run_dir, exist_ok=True)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        plan, data = resolve(cfg), StepData(cfg)

        def train(trainer, steps) -> list[float]:
            return [trainer.train_step(data.microbatches(s, trainer.dp_rank)).loss for s in steps]

        full = build_trainer(cfg, torch.device("cpu"), rank, plan)
        full_losses = train(full, range(STEPS))
        full_params = full.named_parameters_global()
        del full
        first = build_trainer(cfg, torch.device("cpu"), rank, plan)
        first_losses = train(first, range(SAVE_AT))
        path = checkpoint.save(cfg, first, step=SAVE_AT, losses=first_losses)
        del first
        resumed = build_trainer(cfg, torch.device("cpu"), rank, plan)
        meta = checkpoint.load(cfg, resumed, path)
        losses = first_losses + train(resumed, range(meta["step"], STEPS))
        params = resumed.named_parameters_global()
        same = sorted(params) == sorted(full_params) and all(torch.equal(params[k], full_params[k]) for k in params)
        with open(os.path.join(run_dir, f"result_rank{rank}.json"), "w") as f:
            json.dump({"full": full_losses, "resumed": losses, "params_equal": same}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(request):
    return run_matrix(request, MATRIX)


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_resume_continues_the_uninterrupted_run_bitwise(runs, spec):
    case_dir = runs.clean(spec["name"])
    for rank in range(spec["overrides"]["layout.pp"]):
        result = json.loads((case_dir / f"result_rank{rank}.json").read_text())
        assert result["resumed"] == result["full"], f"rank {rank}"
        assert result["params_equal"], f"rank {rank}: parameters differ after resuming"
        assert result["full"][-1] != result["full"][0]  # it trained
