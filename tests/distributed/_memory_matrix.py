"""Measure the vocabulary bytes a real engine step holds, for test_vocab_memory.py.

One group of `world` spawned CPU processes runs every case in turn (the ranks a case needs form a
fresh default group, as in _engine_matrix.py). Each rank trains one step with a probe on its engine
that, between every two actions, sums the bytes of the unique tensor storages reachable from the
engine's per-microbatch state: through containers, dataclasses, pending collectives and the
closures they will run, so whatever a reference keeps alive is counted, not what the code means
to hold. Parameters and their gradients are excluded (they are counted as parameters), and so
are the pipeline's own received gradients ("recv_grad": activation memory). Each rank also writes
the plan's prediction for it, made by the functions `vptrain plan` uses.

    python tests/distributed/_memory_matrix.py CASES.json OUT_DIR WORLD
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
import types
from datetime import timedelta

import torch
import torch.distributed as dist
from _engine_matrix import make_config, train_steps

PIPELINE_KEYS = ("recv_grad",)


def reachable_bytes(root: object, excluded: set[int]) -> int:
    """Bytes of the unique storages of the tensors reachable from root (not those in excluded)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, types.FunctionType):  # a Pending's follow-up: what its closure keeps
            stack += [cell.cell_contents for cell in obj.__closure__ or ()]
        elif isinstance(obj, (type, types.ModuleType, torch.nn.Module)):
            continue
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return sum(storages.values())


class Probe:
    """Records (position of the last executed action, vocabulary bytes held) between actions."""

    def __init__(self) -> None:
        self.trace: list[tuple[int, int]] = []

    def __call__(self, engine) -> None:
        params = list(engine.module.parameters())
        excluded = {p.untyped_storage().data_ptr() for p in params}
        excluded |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        held = {k: v for k, v in engine.state.items() if k[0] not in PIPELINE_KEYS}
        self.trace.append((len(engine.executed) - 1, reachable_bytes(held, excluded)))


def predicted(cfg, stage: int) -> dict:
    from vptrain.layout import model_shape
    from vptrain.plan import make_plan
    from vptrain.schedule.costs import vocab_buffer_sizes
    from vptrain.schedule.memory import vocab_live_bytes

    plan = make_plan(cfg)
    sizes = vocab_buffer_sizes(model_shape(cfg), method=cfg.method.name, p=cfg.layout.pp,
                               store_softmax=cfg.vocab.store_softmax)
    live = vocab_live_bytes(plan.schedule, sizes)[stage]
    return {"live": list(live), "plan_vocab_bytes": plan.stages[stage].memory["vocab_buffers"],
            "actions": [str(a) for a in plan.schedule.ranks[stage]]}


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    run_dir = os.path.join(out_dir, f"case{index}")
    cfg = make_config(case["overrides"], run_dir)
    world = cfg.layout.pp * cfg.layout.dp
    if rank >= world:
        return
    validate(cfg)
    os.makedirs(run_dir, exist_ok=True)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        trainer = build_trainer(cfg, torch.device("cpu"), rank)
        probe = Probe()
        trainer.engine.memory_probe = probe
        train_steps(cfg, trainer)
        result = {"executed": list(trainer.engine.executed), "measured": probe.trace,
                  **predicted(cfg, trainer.stage)}
        with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        del trainer
    finally:
        dist.destroy_process_group()
        gc.collect()


def main() -> int:
    cases_path, out_dir, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    cases = json.load(open(cases_path))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=rank == 0, timeout=timedelta(seconds=300))
    failed = 0
    for i, case in enumerate(cases):
        try:
            run_case(i, case, out_dir, rank, store)
        except Exception:  # noqa: BLE001 - record and continue: one broken case must not hide the others
            failed += 1
            os.makedirs(os.path.join(out_dir, f"case{i}"), exist_ok=True)
            with open(os.path.join(out_dir, f"case{i}", f"error_rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
            if dist.is_initialized():
                dist.destroy_process_group()
        store.add(f"done{i}", 1)  # every rank finishes case i before any starts case i + 1
        while int(store.add(f"done{i}", 0)) < world:
            time.sleep(0.01)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
