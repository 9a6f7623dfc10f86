"""Train configurations under the strict communication-order checker in ONE group of spawned CPU
processes (gloo); test_strict_order.py asserts on what each case wrote.

A case may carry a mutant: {"rank": r, "moves": [[i, j], ...]} moves rank r's action j to just
before its action i in the built schedule (each move in turn), which the trainer then runs WITHOUT
validation (the validator would refuse it; the point is that the runtime check catches what gets
past it).

    python tests/distributed/_strict_cases.py CASES.json OUT_DIR WORLD
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from _engine_matrix import make_config


def mutated_schedule_builder(mutant: dict):
    from vptrain.config import microbatches
    from vptrain.schedule import build_schedule

    def build(cfg):
        s = build_schedule(cfg.method.name, cfg.schedule.name, cfg.layout.pp, microbatches(cfg))
        rank, row = mutant["rank"], list(s.ranks[mutant["rank"]])
        for i, j in mutant["moves"]:
            row.insert(i, row.pop(j))
        return dataclasses.replace(s, ranks=s.ranks[:rank] + (tuple(row),) + s.ranks[rank + 1:])

    return build


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    from vptrain.engine import vocab_trainer
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
                            timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    validated_builder = vocab_trainer.build_schedule_for
    try:
        if case.get("mutant"):
            # Fault injection in this child only: the trainer gets the mutant as if it were the plan.
            vocab_trainer.build_schedule_for = mutated_schedule_builder(case["mutant"])
        from vptrain.data import StepData

        trainer = build_trainer(cfg, torch.device("cpu"), rank)
        data = StepData(cfg)
        losses = [trainer.train_step(data.microbatches(step, trainer.dp_rank)).loss for step in range(cfg.train.steps)]
        checker = trainer.plan.order_check
        result = {"losses": losses, "checked": None if checker is None else checker.checked}
        with open(os.path.join(run_dir, f"result_rank{rank}.json"), "w") as f:
            json.dump(result, f)
        del trainer
    finally:
        vocab_trainer.build_schedule_for = validated_builder
        dist.destroy_process_group()
        gc.collect()


def main() -> int:
    cases_path, out_dir, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    cases = json.load(open(cases_path))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=rank == 0, timeout=timedelta(seconds=300))
    for i, case in enumerate(cases):
        try:
            run_case(i, case, out_dir, rank, store)
        except Exception:  # noqa: BLE001 - recorded for the test; the next case runs on a fresh group
            os.makedirs(os.path.join(out_dir, f"case{i}"), exist_ok=True)
            with open(os.path.join(out_dir, f"case{i}", f"error_rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
        # Every rank finishes case i before any starts case i + 1 (a store barrier).
        store.add(f"done{i}", 1)
        while int(store.add(f"done{i}", 0)) < world:
            time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
