"""Train many configurations in ONE group of spawned CPU processes (gloo), each case as its kind asks.

Starting torch + deepspeed costs seconds per process on these machines, so the test modules'
cases (see _matrix_group.py) run in `world` processes spawned once; for each case the ranks it
needs (pp * dp of them) form a fresh default process group and train it (train_case), the rest
wait. What a case records is up to its "kind":

- "equivalence" (this file, test_vocab_engine.py): losses, gradient norms and parameters; rank 0
  also trains the single-process reference (layout.pp=1) and saves it;
- "memory" (_memory_matrix.py, test_vocab_memory.py): the vocabulary bytes each rank holds
  between actions, and the plan's prediction;
- "eval" (test_eval.py, in a group of its own): losses, eval losses and parameters with and
  without evaluation;
- "strict" (_strict_cases.py, test_strict_order.py): losses and checks of the strict
  communication-order checker, on the validated schedule or on a mutant of it;
- "resume" (test_split_backward.py): an uninterrupted run against one saved after step k and
  resumed in fresh trainers, on the split-backward schedules.

A case that raises on a rank leaves error_rank{rank}.txt in its folder and the next case runs;
the exit status is 0 once every case has run.

    python tests/distributed/_engine_matrix.py CASES.json OUT_DIR WORLD
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

# The kinds not defined here; "eval" cases come from test_eval.py's own group.
KIND_MODULES = {"memory": "_memory_matrix", "strict": "_strict_cases", "eval": "test_eval",
                "resume": "test_split_backward"}


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


def train_case(
    index: int,
    case: dict,
    out_dir: str,
    rank: int,
    store,
    *,
    report: Callable[..., None],
    timeout_s: float | None = None,
    prepare: Callable[..., None] | None = None,
    build_schedule: Callable | None = None,
):
    """Train case's configuration for train.steps steps on the ranks it needs; returns its config.

    The ranks in the case form a fresh default group (timeout_s bounds its collectives; None: the
    configuration's train.collective_timeout_s); the others return at once. prepare(trainer) runs
    before the first step (e.g. to put a probe on the engine), report(cfg, trainer, losses,
    grad_norms) after the last, still in the group. build_schedule(cfg), if given, stands in for the
    validated schedule of the resolved plan the trainer executes (fault injection).
    """
    from vptrain.resolved import resolve
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    run_dir = os.path.join(out_dir, f"case{index}")
    cfg = make_config(case["overrides"], run_dir)
    world = cfg.layout.pp * cfg.layout.dp
    if rank >= world:
        return cfg
    validate(cfg)
    os.makedirs(run_dir, exist_ok=True)
    timeout = cfg.train.collective_timeout_s if timeout_s is None else timeout_s
    dist.init_process_group("gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        plan = resolve(cfg)
        if build_schedule is not None:
            plan = dataclasses.replace(plan, schedule=build_schedule(cfg))
        trainer = build_trainer(cfg, torch.device("cpu"), rank, plan)
        if prepare is not None:
            prepare(trainer)
        losses, norms = train_steps(cfg, trainer)
        report(cfg, trainer, losses, norms)
        del trainer
    finally:
        dist.destroy_process_group()
        gc.collect()
    return cfg


def reference_config(cfg):
    """The unpartitioned single-process configuration a case is compared with."""
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.layout.pp, ref_cfg.layout.dp, ref_cfg.layout.layers_per_stage = 1, 1, None
    ref_cfg.method.name, ref_cfg.schedule.name = "baseline", "1f1b"
    ref_cfg.train.micro_batch_size = cfg.train.micro_batch_size
    ref_cfg.model.activation_checkpointing = "none"  # a recompute run must equal the plain model
    return ref_cfg


def reference(ref_cfg) -> dict:
    from vptrain.engine.single import SingleProcessTrainer
    from vptrain.validate import validate

    validate(ref_cfg)
    trainer = SingleProcessTrainer(ref_cfg, device=torch.device("cpu"))
    initial = trainer.named_parameters_global()
    losses, norms = train_steps(ref_cfg, trainer)
    return {"losses": losses, "grad_norms": norms, "params": trainer.named_parameters_global(), "initial": initial}


def save_reference(cfg, out_dir: str) -> None:
    """cfg's reference.pt. Cases that differ only in layout, method or schedule share one reference
    configuration (seeded, layout-independent initialisation), so it is trained once per group and
    copied: a cache on disk under out_dir, keyed by the whole configuration but its run directory."""
    ref_cfg = reference_config(cfg)
    key = hashlib.sha256(repr(dataclasses.replace(ref_cfg, run_dir="")).encode()).hexdigest()[:16]
    cached = os.path.join(out_dir, "references", f"{key}.pt")
    if not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.save(reference(ref_cfg), cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    shutil.copyfile(cached, os.path.join(cfg.run_dir, "reference.pt"))


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    """An "equivalence" case: the distributed run's result.pt, then rank 0's reference.pt."""

    def report(cfg, trainer, losses, norms) -> None:
        params = trainer.named_parameters_global() if trainer.dp_rank == 0 else {}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, params)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            torch.save({"losses": losses, "grad_norms": norms, "params": merged},
                       os.path.join(cfg.run_dir, "result.pt"))

    cfg = train_case(index, case, out_dir, rank, store, report=report, timeout_s=300)  # a hang guard only
    if rank == 0:
        save_reference(cfg, out_dir)


def case_runner(kind: str) -> Callable[..., None]:
    """run_case(index, case, out_dir, rank, store) of a kind of case."""
    if kind == "equivalence":
        return run_case
    return importlib.import_module(KIND_MODULES[kind]).run_case


def main() -> int:
    cases_path, out_dir, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A kind's module may be a test module, which imports tests/conftest.py as pytest would let it.
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    cases = json.load(open(cases_path))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=rank == 0, timeout=timedelta(seconds=300))
    for i, case in enumerate(cases):
        started = time.monotonic()
        try:
            case_runner(case["kind"])(i, case, out_dir, rank, store)
        except Exception:  # noqa: BLE001 - recorded for the test; one broken case must not hide the others
            os.makedirs(os.path.join(out_dir, f"case{i}"), exist_ok=True)
            with open(os.path.join(out_dir, f"case{i}", f"error_rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
            if dist.is_initialized():
                dist.destroy_process_group()
        # Every rank finishes case i before any starts case i + 1 (a store barrier).
        store.add(f"done{i}", 1)
        while int(store.add(f"done{i}", 0)) < world:
            time.sleep(0.01)
        if rank == 0:  # in the group's log, for finding the slow cases
            print(f"case{i} {case['kind']} {case['name']}: {time.monotonic() - started:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
