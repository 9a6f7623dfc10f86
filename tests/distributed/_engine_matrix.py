"""Run many training configurations in ONE group of spawned CPU processes (gloo).

Starting torch + deepspeed costs seconds per process on these machines, so the equivalence matrix
spawns `world` processes once; for each configuration the ranks it needs (pp * dp of them) form a
fresh default process group and train it for a few steps, the rest wait. Rank 0 also trains the
single-process reference (layout.pp=1) of every configuration and saves both results.

    python tests/distributed/_engine_matrix.py CASES.json OUT_DIR WORLD
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def make_config(overrides: dict, run_dir: str):
    from omegaconf import OmegaConf

    from vptrain.config import RunConfig

    base = OmegaConf.structured(RunConfig)
    dotlist = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist), {"run_dir": run_dir, "logger": {"name": "none"}})
    return OmegaConf.to_object(merged)


def train_steps(cfg, trainer) -> tuple[list[float], list[float | None]]:
    """Per step: the loss and the gradient norm the trainer clipped with."""
    from vptrain.data import StepData

    data = StepData(cfg)
    results = [trainer.train_step(data.microbatches(step, trainer.dp_rank)) for step in range(cfg.train.steps)]
    return [r.loss for r in results], [r.grad_norm for r in results]


def reference(cfg) -> tuple[list[float], dict]:
    from vptrain.engine.single import SingleProcessTrainer
    from vptrain.validate import validate

    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.layout.pp, ref_cfg.layout.dp, ref_cfg.layout.layers_per_stage = 1, 1, None
    ref_cfg.method.name, ref_cfg.schedule.name = "baseline", "1f1b"
    ref_cfg.train.micro_batch_size = cfg.train.micro_batch_size
    validate(ref_cfg)
    trainer = SingleProcessTrainer(ref_cfg, device=torch.device("cpu"))
    initial = trainer.named_parameters_global()
    losses, norms = train_steps(ref_cfg, trainer)
    return losses, norms, trainer.named_parameters_global(), initial


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    run_dir = os.path.join(out_dir, f"case{index}")
    cfg = make_config(case["overrides"], run_dir)
    world = cfg.layout.pp * cfg.layout.dp
    if rank < world:
        validate(cfg)
        os.makedirs(run_dir, exist_ok=True)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=300))  # a hang guard only
        try:
            trainer = build_trainer(cfg, torch.device("cpu"), rank)
            losses, norms = train_steps(cfg, trainer)
            params = trainer.named_parameters_global() if trainer.dp_rank == 0 else {}
            gathered: list = [None] * world
            dist.all_gather_object(gathered, params)
            if rank == 0:
                merged = {k: v for part in gathered for k, v in part.items()}
                torch.save({"losses": losses, "grad_norms": norms, "params": merged},
                           os.path.join(run_dir, "result.pt"))
            del trainer
        finally:
            dist.destroy_process_group()
            gc.collect()
    if rank == 0:
        ref_losses, ref_norms, ref_params, initial = reference(cfg)
        torch.save({"losses": ref_losses, "grad_norms": ref_norms, "params": ref_params, "initial": initial},
                   os.path.join(run_dir, "reference.pt"))


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
        # Every rank finishes case i before any starts case i + 1 (a store barrier).
        store.add(f"done{i}", 1)
        while int(store.add(f"done{i}", 0)) < world:
            time.sleep(0.01)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
