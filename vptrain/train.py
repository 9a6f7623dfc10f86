"""The training loop run by every rank."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from vptrain import checkpoint
from vptrain.config import RunConfig, to_dict
from vptrain.console import console_line
from vptrain.data import StepData
from vptrain.engine.deepspeed_setup import new_groups_time_out_after
from vptrain.evaluate import Evaluator
from vptrain.launch.env import LaunchEnv, cuda_device_index, nccl_environment
from vptrain.metrics import RunMetrics, gather_stage_stats, rank_stats
from vptrain.preempt import Preemption
from vptrain.resolved import ResolvedPlan, resolve

T = TypeVar("T")


class TrainingError(RuntimeError):
    """A fault that ends the run with a clear message (non-finite loss, ...)."""


def resolve_device(cfg: RunConfig, local_rank: int) -> torch.device:
    """This rank's device; on CUDA it is bound here, once, for torch and for DeepSpeed."""
    want = cfg.cluster.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        # DeepSpeed takes LOCAL_RANK for the device ordinal (PipelineModule moves itself to
        # cuda:LOCAL_RANK, the engine calls set_device(LOCAL_RANK)); under per-task GPU binding the
        # ordinal is 0 while the local rank is not, so DeepSpeed is given the ordinal.
        os.environ["LOCAL_RANK"] = str(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


@dataclass(frozen=True)
class ProcessGroupSpec:
    backend: str
    timeout: timedelta  # every group's: the default one, the vocabulary groups and DeepSpeed's
    env: dict[str, str]  # set before the backend initialises


def process_group_spec(cfg: RunConfig, device_type: str, environ: dict[str, str] | None = None) -> ProcessGroupSpec:
    nccl = device_type == "cuda"
    return ProcessGroupSpec(
        backend="nccl" if nccl else "gloo",
        timeout=timedelta(seconds=cfg.train.collective_timeout_s),
        env=nccl_environment(environ) if nccl else {},
    )


def init_process_group(cfg: RunConfig, launch: LaunchEnv, device: torch.device, store) -> ProcessGroupSpec:
    spec = process_group_spec(cfg, device.type)
    os.environ.update(spec.env)
    dist.init_process_group(
        backend=spec.backend,
        store=store,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=spec.timeout,
    )
    return spec


def _barrier(device: torch.device) -> None:
    """NCCL's barrier is a collective on a device: name ours rather than let torch guess one."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def build_trainer(cfg: RunConfig, device: torch.device, rank: int, plan: ResolvedPlan | None = None):
    """The trainer of this rank, executing `plan` (default: the config's resolved plan, the one
    `vptrain plan` prints): its stage's layers, its vocabulary rows and its action list."""
    plan = plan or resolve(cfg)
    if cfg.layout.pp == 1:
        from vptrain.engine.single import SingleProcessTrainer

        return SingleProcessTrainer(cfg, device=device, dp_rank=rank, plan=plan)
    if cfg.method.name in ("baseline", "redis") and cfg.schedule.name == "1f1b":
        # DeepSpeed's own 1F1B engine; every other schedule of the plain methods (zb-h1, vhalf: a
        # split backward) runs on ours, as the vocabulary methods do.
        from vptrain.engine.pipeline import PipelineTrainer

        return PipelineTrainer(cfg, device=device, plan=plan)
    from vptrain.engine.vocab_trainer import VocabTrainer

    return VocabTrainer(cfg, device=device, plan=plan)


def train_worker(cfg: RunConfig, launch: LaunchEnv, store=None) -> dict | None:
    """Run the whole training job on this rank; returns the summary on the logging rank."""
    return run_on_rank(cfg, launch, store, _train)


def run_on_rank(cfg: RunConfig, launch: LaunchEnv, store, job: Callable[..., T]) -> T:
    """job(cfg, launch, device, is_logger) on this rank's device, inside the job's process group
    (the training loop, or `vptrain eval`'s, vptrain/evaluate.py)."""
    device = resolve_device(cfg, launch.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.launcher.threads_per_rank)
    if launch.world_size > 1 or cfg.layout.pp > 1:
        init_process_group(cfg, launch, device, store)
    is_logger = launch.rank == 0
    finished = False
    try:
        # DeepSpeed creates its groups (some lazily) without a timeout: they get ours.
        with new_groups_time_out_after(timedelta(seconds=cfg.train.collective_timeout_s)):
            result = job(cfg, launch, device, is_logger)
        finished = True
        return result
    finally:
        if dist.is_initialized():
            if finished:
                # Tear down together: a rank that destroys its gloo context while a peer is still
                # using it can abort at exit ("terminate called without an active exception").
                _barrier(device)
            dist.destroy_process_group()


def _train(cfg: RunConfig, launch: LaunchEnv, device: torch.device, is_logger: bool) -> dict | None:
    plan = resolve(cfg)  # once: the layout, shards and schedule this rank executes
    trainer = build_trainer(cfg, device, launch.rank, plan)
    data = StepData(cfg)
    say = (lambda msg: console_line(f"vptrain: {msg}")) if is_logger else (lambda msg: None)
    resume_from = checkpoint.resolve_resume(cfg, report=say)
    wandb = None
    if is_logger and cfg.logger.name == "wandb":
        from vptrain.wandb_logger import WandbLogger, run_config

        # Continue the W&B run of the checkpoint resumed from; anything else is a new W&B run.
        resume_id = (checkpoint.read_meta(resume_from) or {}).get("wandb_run_id") if resume_from else None
        wandb = WandbLogger(cfg, config=run_config(cfg, to_dict(cfg), plan=plan), resume_id=resume_id)
        if resume_id is None:  # a resumed W&B run has it already
            wandb.log_schedule(cfg, plan)
    metrics = RunMetrics(cfg, is_logger=is_logger, world_size=launch.world_size, wandb=wandb)
    if is_logger:
        say(f"{cfg.method.name} on {cfg.schedule.name}, pp={cfg.layout.pp} dp={cfg.layout.dp}, "
            f"{cfg.train.steps} steps, run dir {cfg.run_dir}")
    start_step, losses = 0, []
    if resume_from is not None:
        try:
            meta = checkpoint.load(cfg, trainer, resume_from)
        except checkpoint.CheckpointError as err:
            raise TrainingError(str(err)) from None
        start_step, losses = meta["step"], meta["losses"]
        say(f"resumed from {resume_from} at step {start_step}")
    metrics.restore(losses)  # metrics.jsonl keeps exactly the steps before start_step
    last_step, stop_at = cfg.train.steps, cfg.train.stop_at_step
    if 0 < stop_at <= start_step:
        say(f"train.stop_at_step={stop_at} is already passed (resumed at step {start_step}): stopping without "
            f"training; raise train.stop_at_step or set it to 0 to continue")
        last_step = start_step
    every = cfg.train.checkpoint_every
    evaluator = Evaluator(cfg) if cfg.train.eval_every else None
    preempt = Preemption.install(cfg.cluster.signal)  # Slurm's pre-timeout / preemption signals
    exit_code = 1
    try:
        for step in range(start_step, last_step):
            micro = data.microbatches(step, trainer.dp_rank)
            start = time.perf_counter()
            result = trainer.train_step(micro)
            iter_s = time.perf_counter() - start
            if not math.isfinite(result.loss):
                raise TrainingError(f"step {step + 1}: loss is {result.loss}; stopping (no step taken after it). "
                                    f"{checkpoint.last_good_note(cfg)}")
            stages = gather_stage_stats(rank_stats(trainer, device, trainer.take_busy_seconds()), trainer.num_stages)
            done = step + 1
            # Every train.eval_every steps and after the last: the same decision on every rank (a collective).
            evaluate = evaluator is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
            metrics.record(step, loss=result.loss, lr=trainer.current_lr(), grad_norm=result.grad_norm,
                           iter_s=iter_s, stages=stages, eval_loss=evaluator.run(trainer).loss if evaluate else None)
            preempted = preempt.agreed(device) and done < cfg.train.steps  # collective: same answer everywhere
            stopping = 0 < stop_at <= done or preempted
            final = done == cfg.train.steps and cfg.train.checkpoint_at_end
            if (every and done % every == 0) or final or stopping:
                try:
                    checkpoint.save(cfg, trainer, step=done, losses=metrics.losses,
                                    wandb_run_id=wandb.run_id if wandb is not None else None)
                except checkpoint.CheckpointError as err:  # weights went non-finite: nothing was saved
                    raise TrainingError(str(err)) from None
            if preempted:
                if wandb is not None:
                    wandb.mark_preempting()
                preempt.record(cfg.run_dir, step=done, total_steps=cfg.train.steps, is_logger=is_logger)
                break
            if stopping:
                say(f"stopping at step {done} (train.stop_at_step); resume with train.resume=auto")
                break
        if cfg.train.dump_params:
            _dump_params(cfg, trainer)
        summary = metrics.summary() if is_logger else None
        if is_logger:
            _write_json(os.path.join(cfg.run_dir, "summary.json"), summary)
            metrics.print_stage_table()
            if wandb is not None:
                wandb.summary({k: v for k, v in summary.items() if not isinstance(v, list)})
        exit_code = 0
        return summary
    finally:
        if wandb is not None:
            wandb.finish(exit_code=exit_code)
        preempt.close()  # last: under submitit this requeues the job, which ends this process


def _dump_params(cfg: RunConfig, trainer) -> None:
    """Each stage of data-parallel replica 0 saves its parameters under the single-process names
    (used by the equivalence tests)."""
    if trainer.dp_rank != 0:
        return
    out = os.path.join(cfg.run_dir, "params")
    os.makedirs(out, exist_ok=True)
    torch.save(trainer.named_parameters_global(), os.path.join(out, f"stage{trainer.stage}.pt"))


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
