"""The "strict" cases of _engine_matrix.py: train under the strict communication-order checker
(the ranks a case needs train it there, in train_case); test_strict_order.py asserts on what each
case wrote. The group's collectives time out after the case's train.collective_timeout_s.

A case may carry a mutant: {"rank": r, "moves": [[i, j], ...]} moves rank r's action j to just
before its action i in the built schedule (each move in turn), which the trainer then runs WITHOUT
validation (the validator would refuse it; the point is that the runtime check catches what gets
past it).
"""

from __future__ import annotations

import dataclasses
import json
import os

from _engine_matrix import train_case


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
    """A "strict" case: result_rank{rank}.json with the losses and the number of checked operations."""

    def report(cfg, trainer, losses, norms) -> None:
        checker = trainer.plan.order_check
        result = {"losses": losses, "checked": None if checker is None else checker.checked}
        with open(os.path.join(cfg.run_dir, f"result_rank{rank}.json"), "w") as f:
            json.dump(result, f)

    # Fault injection: the trainer gets the mutant as if it were the plan.
    mutant = mutated_schedule_builder(case["mutant"]) if case.get("mutant") else None
    train_case(index, case, out_dir, rank, store, report=report, build_schedule=mutant)
