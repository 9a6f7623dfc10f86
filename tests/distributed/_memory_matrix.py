"""Measure the vocabulary bytes a real engine step holds, for test_vocab_memory.py.

The "memory" cases of _engine_matrix.py (the ranks a case needs train it there, in train_case).
Each rank trains one step with a probe on its engine that, between every two actions, sums the
bytes of the unique tensor storages reachable from the engine's per-microbatch state: through
containers, dataclasses, pending collectives and the closures they will run, so whatever a
reference keeps alive is counted, not what the code means to hold. Parameters and their
gradients are excluded (they are counted as parameters), and so are the pipeline's own received
gradients ("recv_grad": activation memory). Each rank also writes the plan's prediction for it,
made by the functions `vptrain plan` uses.

Every step also runs inside an ActivationMeter (vptrain/engine/activation_meter.py): the bytes
autograd saves plus the pipeline's own buffers, at their peak, by the instruction that saved them,
beside the plan's activation figure for the rank (test_activation_memory.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import torch
from _engine_matrix import train_case

PIPELINE_KEYS = ("recv_grad", "weight_work")  # activation memory (W's kept gradients: the meter)


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
    rank = plan.stages[stage]
    activations = {"plan_activation_bytes": rank.memory["activations"], "plan_in_flight": rank.peak_in_flight,
                   "plan_layers": list(rank.layout.layers)}
    if cfg.method.name in ("baseline", "redis"):  # no vocabulary buffers outside the one-shard loss
        return {**activations, "actions": [str(a) for a in plan.schedule.ranks[stage]]}
    sizes = vocab_buffer_sizes(model_shape(cfg), method=cfg.method.name, p=cfg.layout.pp,
                               store_softmax=cfg.vocab.store_softmax)
    live = vocab_live_bytes(plan.schedule, sizes)[stage]
    return {"live": list(live), "plan_vocab_bytes": plan.stages[stage].memory["vocab_buffers"],
            "actions": [str(a) for a in plan.schedule.ranks[stage]], **activations}


class _Only:
    def __init__(self, buffers, key):
        self.pipe_buffers = {k: v for k, v in buffers.items() if k == key}


def metered(trainer, reports: list[dict]) -> None:
    """Run each of trainer's steps inside an activation meter; one report per step into `reports`."""
    from vptrain.engine.activation_meter import meter_for, pipeline_buffers

    meter, step = meter_for(trainer, record=True), trainer.train_step

    def train_step(micro):
        meter.exclude(t for pair in micro for t in pair)  # the batch is data, not activations
        with meter:
            result = step(micro)
        buffers = trainer.engine.pipe_buffers
        left = {k: [list(t.shape) for t in pipeline_buffers(_Only(buffers, k))] for k in buffers}
        reports.append({**dataclasses.asdict(meter.report()), "buffers_after": {k: v for k, v in left.items() if v},
                        "saves": meter.saved_kinds()})
        return result

    trainer.train_step = train_step


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    """A "memory" case: one step with a Probe on the engine; rank{rank}.json, measured and predicted."""
    probe, activations = Probe(), []

    def prepare(trainer) -> None:
        if hasattr(trainer.engine, "memory_probe"):  # the vocabulary engines (baseline: activations only)
            trainer.engine.memory_probe = probe
        metered(trainer, activations)

    def report(cfg, trainer, losses, norms) -> None:
        result = {"executed": list(trainer.engine.executed), "measured": probe.trace,
                  "activations": activations, **predicted(cfg, trainer.stage)}
        with open(os.path.join(cfg.run_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)

    train_case(index, case, out_dir, rank, store, report=report, timeout_s=60, prepare=prepare)
