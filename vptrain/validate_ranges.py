"""The allowed range of every numeric key of the schema (vptrain/config.py), checked before launch.

One table, one rule per key: Hydra checks the type (an int key refuses 1.5), this checks the value.
Floats must also be finite: OmegaConf reads `nan` and `inf` as floats, and a NaN compares false
with every bound, so `optim.lr=nan` would otherwise pass `lr > 0` and train on NaNs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vptrain.config import RunConfig

WEEK_S = 7 * 24 * 3600.0
MAX_SEED = 2**63 - 1  # numpy's SeedSequence takes non-negative ints; init.stable_seed works mod 2^63 - 1


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """The low bound itself is refused (> low rather than >= low)."""
    high_open: bool = False
    hint: str = ""
    """What to do instead, appended to the message."""

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if lo and hi:
            return f"must be {lo} and {hi}"
        return f"must be {lo or hi}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT_INTERVAL = Range(0, 1, high_open=True, hint="a moment's decay rate in [0, 1), e.g. 0.9 or 0.95")

RANGES: dict[str, Range] = {
    "model.vocab_size": AT_LEAST_1,
    "model.num_layers": AT_LEAST_1,
    "model.hidden_size": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1,
    "model.seq_len": AT_LEAST_1,
    "model.init_std": Range(0, low_open=True, hint="the initial weights' standard deviation, e.g. 0.02"),
    "model.max_position_embeddings": Range(1, hint="or null for model.seq_len"),
    "model.norm_eps": Range(0, low_open=True, hint="e.g. 1e-5"),
    "model.num_kv_heads": Range(1, hint="or null for model.num_heads"),
    "model.intermediate_size": Range(1, hint="or null for 8h/3 rounded up to a multiple of 16"),
    "model.rope_theta": Range(0, low_open=True, hint="e.g. 10000 or 500000, or null for 10000"),
    "layout.pp": AT_LEAST_1,
    "layout.dp": AT_LEAST_1,
    "schedule.virtual_stages": Range(2, hint="model chunks per rank of schedule=interleaved, e.g. 2"),
    "vocab.pad_to_multiple_of": AT_LEAST_1,
    "vocab.chunk_tokens": Range(0, hint="0 runs all tokens at once, null lets the plan choose"),
    "train.steps": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_1,
    "train.micro_batch_size": AT_LEAST_1,
    "train.seed": Range(0, MAX_SEED),
    "train.log_every": AT_LEAST_1,
    "train.grad_clip": Range(0, hint="0 disables clipping"),
    "train.checkpoint_every": Range(0, hint="0 saves only at the end"),
    "train.stop_at_step": Range(0, hint="0 runs to train.steps"),
    "train.eval_every": Range(0, hint="0 evaluates only with `vptrain eval`"),
    "eval.sequences": AT_LEAST_1,
    "train.collective_timeout_s": Range(0, WEEK_S, low_open=True, hint="seconds, e.g. 300"),
    "optim.lr": POSITIVE,
    "optim.min_lr": AT_LEAST_0,
    "optim.warmup_steps": AT_LEAST_0,
    "optim.weight_decay": Range(0, hint="0 disables weight decay"),
    "optim.beta1": UNIT_INTERVAL,
    "optim.beta2": UNIT_INTERVAL,
    "optim.eps": Range(0, low_open=True, hint="e.g. 1e-8"),
    "optim.zero_stage": Range(0, 1, hint="pipeline parallelism supports ZeRO stage 0 or 1"),
    "logger.system_metrics_interval_s": Range(0, hint="seconds between samples, 0 turns them off"),
    "launcher.master_port": Range(0, 65535, hint="0 picks a free port"),
    "launcher.threads_per_rank": AT_LEAST_1,
    "cluster.gpu_memory_gb": POSITIVE,
    "cluster.gpus_per_node": AT_LEAST_0,
    "cluster.nodes": AT_LEAST_1,
    "cluster.cpus_per_task": AT_LEAST_1,
    "cluster.mem_gb": Range(1, hint="GB per node, or null"),
    "cluster.mem_per_gpu_gb": Range(1, hint="GB per GPU, or null"),
    "cluster.signal_delay_s": AT_LEAST_0,
    "cluster.max_restarts": AT_LEAST_0,
    "search.gpus": Range(1, hint="or null for layout.pp * layout.dp"),
    "search.memory_gib": Range(0, low_open=True, hint="or null for cluster.gpu_memory_gb"),
    "search.top": AT_LEAST_1,
    "search.margin": AT_LEAST_0,
    "search.max_simulations": AT_LEAST_1,
}


def value_of(cfg: RunConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: RunConfig) -> None:
    """Every key of RANGES within its range; floats finite. None (an optional key left unset) passes."""
    for key, rule in RANGES.items():
        value = value_of(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value}; {rule.describe()}"
                             + (f" ({rule.hint})" if rule.hint else ""))
        if not rule.admits(value):  # type: ignore[arg-type]
            raise ValueError(f"{key}: {rule.describe()}, got {value}" + (f" ({rule.hint})" if rule.hint else ""))
    t, o = cfg.train, cfg.optim
    if t.stop_at_step > t.steps:
        raise ValueError(f"train.stop_at_step: {t.stop_at_step} > train.steps={t.steps}; the run would never stop "
                         "there (0 runs to train.steps)")
    if o.decay == "cosine" and o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr: {o.min_lr:g} > optim.lr={o.lr:g}; the cosine schedule decays from optim.lr "
                         "down to optim.min_lr")
