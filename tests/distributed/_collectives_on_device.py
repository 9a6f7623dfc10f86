"""Rank function of test_devices_and_timeouts.py: what every collective of a training step is
handed, and the timeout of every process group a training run creates, on 2 gloo processes.

Devices. On a GPU NCCL takes only tensors on the rank's CUDA device; a tensor made without
`device=` is a CPU tensor, which gloo accepts without complaint. To see that class of bug on CPU,
the call sites run with torch's default device set to "meta" (`with torch.device("meta")`): a
tensor made without `device=` lands on meta, one made on the configured device stays on the CPU.
`CollectiveDevices` watches the c10d ops at the dispatcher and rejects any tensor that is not on
the configured device before the op is issued (on every rank alike, so nothing hangs).
Checked: a training step of each engine (DeepSpeed's 1F1B pipeline, the vocabulary engine on 1F1B
and V-Half: p2p, vocabulary collectives, gradient all-reduces, the fp64 norm), the single-process
trainer's data-parallel step, and the training loop's own collectives (preemption flag, per-stage
stats, checkpoint barrier). What it cannot see: a tensor explicitly put on the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

TIMEOUT_S = 77.0  # train.collective_timeout_s here: neither torch's defaults (600, 1800 s) nor _spawn's


class CollectiveOnWrongDevice(RuntimeError):
    pass


class CollectiveDevices(TorchDispatchMode):
    """Fails a c10d op (all_reduce, broadcast, all_gather, reduce, barrier, send, ...) whose tensors
    are not all on `device`; records the ops it let through."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            tensors = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
            wrong = sorted({str(t.device) for t in tensors if t.device != self.device})
            if wrong:
                raise CollectiveOnWrongDevice(f"{func} got tensors on {wrong}; the backend's device is {self.device}")
            self.seen.append(func.__name__.split(".")[0])
        return func(*args, **kwargs)


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten(item)
    else:
        yield obj


def _config(overrides: dict, run_dir: str):
    from _engine_matrix import make_config

    from vptrain.validate import validate

    cfg = make_config({"train.collective_timeout_s": TIMEOUT_S, "train.steps": 2, "model.seq_len": 16,
                       "train.micro_batch_size": 1, **overrides}, run_dir)
    validate(cfg)
    return cfg


def _group_timeouts() -> list[float]:
    """The timeout of every process group this rank belongs to, in seconds."""
    from torch.distributed.distributed_c10d import _world  # test-only peek at torch's group registry

    out = []
    for group in _world.pg_map:
        backend = group._get_backend(torch.device("cpu"))
        out.append(backend.options._timeout.total_seconds())
    return out


def _check(site) -> str:
    """Run site() under the meta default device: "" when every collective it issued was on the CPU."""
    try:
        with torch.device("meta"), CollectiveDevices(torch.device("cpu")) as mode:
            site()
    except CollectiveOnWrongDevice as err:
        return str(err)
    return "" if mode.seen else "no collective seen"


def _train(cfg, trainer, steps: range) -> None:
    from vptrain.data import StepData

    data = StepData(cfg)
    for step in steps:
        trainer.train_step(data.microbatches(step, trainer.dp_rank))


def _loop_call_sites(cfg, rank: int) -> dict[str, str]:
    """The training loop's own collectives and the single-process trainer's data-parallel step."""
    from vptrain import checkpoint
    from vptrain.engine.grad_norm import global_norm
    from vptrain.engine.single import SingleProcessTrainer
    from vptrain.metrics import gather_stage_stats
    from vptrain.preempt import Preemption

    cpu = torch.device("cpu")
    trainer = SingleProcessTrainer(cfg, device=cpu, dp_rank=rank)  # parameters made outside meta
    grads = [torch.full((3,), float(rank + 1))]
    sites = {
        "preempt.agreed": lambda: Preemption(signals=[]).agreed(cpu),
        "metrics.gather_stage_stats": lambda: gather_stage_stats({"stage": 0, "busy_s": 0.0}, 1),
        "checkpoint barrier": checkpoint._barrier,
        "grad_norm.global_norm": lambda: global_norm(grads, groups=[None], device=cpu),
        "single.train_step (dp=2)": lambda: _train(cfg, trainer, range(cfg.train.steps)),
        # The control: a tensor made without device= must be caught, or the check proves nothing.
        "control: all_reduce(torch.zeros(1))": lambda: dist.all_reduce(torch.zeros(1)),
    }
    return {name: _check(site) for name, site in sites.items()}


PIPELINES = {  # one trainer of each engine class, on the 2 ranks as pp=2
    "PipelineTrainer (baseline 1f1b)": {"method.name": "baseline", "train.global_batch_size": 2},
    "VocabTrainer (vocab-2 1f1b)": {"method.name": "vocab-2", "train.global_batch_size": 2},
    "VocabTrainer (vocab-1 vhalf)": {"method.name": "vocab-1", "schedule.name": "vhalf",
                                     "train.global_batch_size": 4},
}


def worker(rank: int, world: int, port: int, run_dir: str) -> dict:
    from vptrain.engine.deepspeed_setup import new_groups_time_out_after
    from vptrain.launch.env import LaunchEnv, export
    from vptrain.train import build_trainer, init_process_group

    cfgs = {name: _config({"layout.pp": 2, **o}, os.path.join(run_dir, str(i)))
            for i, (name, o) in enumerate(PIPELINES.items())}
    dist.destroy_process_group()  # _spawn's group; the run's own is made the way train_worker makes it
    store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=rank == 0, timeout=timedelta(seconds=60))
    launch = LaunchEnv(rank, world, rank, "127.0.0.1", port)
    export(launch)  # DeepSpeed reads RANK/LOCAL_RANK/WORLD_SIZE from the environment
    init_process_group(next(iter(cfgs.values())), launch, torch.device("cpu"), store)

    # Every group a run makes (the vocabulary groups, DeepSpeed's grid and p2p pairs, and any made
    # lazily during a step) must time out after train.collective_timeout_s.
    sites = {}
    with new_groups_time_out_after(timedelta(seconds=TIMEOUT_S)):
        for name, cfg in cfgs.items():
            trainer = build_trainer(cfg, torch.device("cpu"), rank)
            # Step 1 outside the check: DeepSpeed's one-time p2p shape exchange copies a host list
            # into a device buffer, right on a GPU, but a copy meta cannot take.
            _train(cfg, trainer, range(1))
            sites[name] = _check(lambda cfg=cfg, trainer=trainer: _train(cfg, trainer, range(1, cfg.train.steps)))
            del trainer
        timeouts = _group_timeouts()
    outside = dist.new_group(list(range(world)))  # the wrapper is gone after the block
    outside_timeout = outside._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    single = _config({"method.name": "baseline", "layout.pp": 1, "layout.dp": 2, "train.global_batch_size": 4},
                     os.path.join(run_dir, "single"))
    sites.update(_loop_call_sites(single, rank))
    return {"timeouts": timeouts, "outside_timeout": outside_timeout, "call_sites": sites}
