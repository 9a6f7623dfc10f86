"""Evaluation: the mean token loss over the first eval.sequences windows of data.eval_path.

Window i is tokens[i*S : i*S + S + 1] of the token file (S = model.seq_len; inputs all but its last
token, targets all but its first), in file order, so any other tool can recompute the number.
Windows go through the trainer a training batch (train.global_batch_size windows) at a time, split
over data-parallel ranks and microbatches as a training step is (data.EvalBatches), by the trainer's
`eval_step`: the training step's own schedule with the optimizer step replaced by dropping the
gradients (engine/pipeline.py discard_gradients). So the eval is exact in every layout, method and
schedule, and no rank ever holds more of the vocabulary tables than it trains with.

`vptrain eval` (launch/entry.py `evaluate`) runs `eval_worker` on every rank: the run's weights (a
checkpoint through train.resume, model.init_from, or the seeded initialisation), then the eval,
then rank 0 writes run_dir/eval.json. During training, train.py runs the same Evaluator every
train.eval_every steps (and after the last step) and logs `eval/loss`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from vptrain.config import RunConfig
from vptrain.data import EvalBatches
from vptrain.launch.env import LaunchEnv

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean token loss (natural log) over `sequences` windows."""
    sequences: int
    tokens: int  # targets scored: sequences * seq_len


class Evaluator:
    """The eval windows of a run, ready to be evaluated by any of its trainers (a collective: every
    rank of the job calls `run` at the same point)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data = EvalBatches(cfg)

    def run(self, trainer) -> EvalResult:
        total = 0.0  # host fp64: one read per eval batch, as a training step reads its loss
        for step in range(self.data.steps):
            total += trainer.eval_step(self.data.microbatches(step, trainer.dp_rank))
        # The eval's compute is not the next training step's: drop it from the per-step clocks.
        trainer.take_busy_seconds()
        take_instructions = getattr(trainer, "take_instruction_seconds", None)  # pipeline engines only
        if take_instructions is not None:
            take_instructions()
        n, g = self.cfg.eval.sequences, self.cfg.train.global_batch_size
        # A batch's loss is the mean of its G/b microbatch means (b = train.micro_batch_size), a
        # padding microbatch's being 0 (no targets). Every real microbatch has b*S targets, so the
        # token mean is the sum of the real microbatch means over their number n/b:
        # sum_k loss_k * (G/b) / (n/b).
        return EvalResult(loss=total * g / n, sequences=n, tokens=n * self.cfg.model.seq_len)


def eval_worker(cfg: RunConfig, launch: LaunchEnv, store=None) -> dict | None:
    """`vptrain eval` on this rank; returns what eval.json holds on the logging rank."""
    from vptrain.train import run_on_rank

    return run_on_rank(cfg, launch, store, _evaluate)


def _evaluate(cfg: RunConfig, launch: LaunchEnv, device: torch.device, is_logger: bool) -> dict | None:
    from vptrain import checkpoint
    from vptrain.resolved import resolve
    from vptrain.train import TrainingError, build_trainer

    say = (lambda msg: print(f"vptrain: {msg}", flush=True)) if is_logger else (lambda msg: None)
    trainer = build_trainer(cfg, device, launch.rank, resolve(cfg))
    resume_from, step = checkpoint.resolve_resume(cfg, report=say), 0
    if resume_from is not None:
        try:
            step = checkpoint.load(cfg, trainer, resume_from)["step"]
        except checkpoint.CheckpointError as err:
            raise TrainingError(str(err)) from None
    weights = (f"checkpoint {resume_from} (step {step})" if resume_from else
               f"model.init_from={cfg.model.init_from}" if cfg.model.init_from else "the seeded initialisation")
    say(f"evaluating {weights} on {cfg.eval.sequences} windows of {cfg.data.eval_path}: {cfg.method.name} on "
        f"{cfg.schedule.name}, pp={cfg.layout.pp} dp={cfg.layout.dp}")
    result = Evaluator(cfg).run(trainer)
    if not math.isfinite(result.loss):
        raise TrainingError(f"eval loss is {result.loss}: the weights ({weights}) are not usable")
    if not is_logger:
        return None
    out = {
        **asdict(result),
        "seq_len": cfg.model.seq_len,
        "eval_path": os.path.abspath(os.path.expanduser(cfg.data.eval_path)),
        "checkpoint": os.path.abspath(resume_from) if resume_from else None,
        "step": step,
        "init_from": cfg.model.init_from,
        "method": cfg.method.name,
        "schedule": cfg.schedule.name,
        "pp": cfg.layout.pp,
        "dp": cfg.layout.dp,
        "precision": cfg.precision,
    }
    path = os.path.join(cfg.run_dir, EVAL_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)
    say(f"eval loss {result.loss:.6f} over {result.tokens:,} tokens -> {path}")
    return out
