"""Weights & Biases on the logging rank: offline unless an API key is configured.

The key is only ever read from the environment or wandb's own login; it is never copied into
the config, a log line, or a file vptrain writes.
"""

from __future__ import annotations

import hashlib
import netrc
import os
from typing import Any

from vptrain.config import RunConfig


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(cfg: RunConfig) -> str:
    if cfg.logger.mode == "auto":
        return "online" if api_key_configured() else "offline"
    return cfg.logger.mode


def run_id(cfg: RunConfig) -> str:
    """Stable across restarts and requeues of the same run directory."""
    return hashlib.sha1(os.path.abspath(cfg.run_dir).encode()).hexdigest()[:16]


def run_name(cfg: RunConfig) -> str:
    if cfg.logger.run_name:
        return cfg.logger.run_name
    relevant = [o for o in cfg.overrides if not o.startswith(("hydra.", "logger", "experiment="))]
    return ",".join(relevant) or cfg.experiment


def run_group(cfg: RunConfig) -> str:
    """logger.group, which the CLI fills in for a multirun (experiment + sweep), else the experiment."""
    if cfg.logger.group:
        return cfg.logger.group
    return cfg.experiment


def stage_layer_counts(cfg: RunConfig) -> list[int]:
    try:
        from vptrain.layout import stage_layers
    except ImportError:  # the layout module is optional here: fall back to an even split
        if cfg.layout.layers_per_stage:
            return list(cfg.layout.layers_per_stage)
        layers, p = cfg.model.num_layers, cfg.layout.pp
        return [layers // p + (1 if i >= p - layers % p else 0) for i in range(p)]
    return [int(n) for n in stage_layers(cfg)]


def derived_layout(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What the YAML does not say but a comparison needs: layers and vocabulary rows per stage and
    which global rank runs which (stage, data-parallel replica)."""
    from vptrain.config import VOCAB_METHODS, microbatches, padded_vocab_size

    pp, vocab = cfg.layout.pp, padded_vocab_size(cfg)
    if cfg.method.name in VOCAB_METHODS:
        rows = [{"input": vocab // pp, "output": vocab // pp} for _ in range(pp)]
    else:  # embedding on the first stage, output layer on the last
        rows = [{"input": vocab if s == 0 else 0, "output": vocab if s == pp - 1 else 0} for s in range(pp)]
    return {
        "world_size": world_size,
        "microbatches": microbatches(cfg),
        "padded_vocab_size": vocab,
        "layers_per_stage": stage_layer_counts(cfg),
        "vocab_rows_per_stage": rows,
        # vptrain numbers ranks stage-fastest: rank = dp_index * pp + stage.
        "rank_map": {str(r): {"stage": r % pp, "dp": r // pp} for r in range(world_size)},
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def run_config(cfg: RunConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """The W&B config: the resolved run config plus the derived layout under `derived`."""
    return {**resolved, "derived": derived_layout(cfg, cfg.layout.pp * cfg.layout.dp)}


class WandbLogger:
    def __init__(self, cfg: RunConfig, *, config: dict[str, Any]):
        import wandb

        self.mode = resolve_mode(cfg)
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=run_group(cfg),
            name=run_name(cfg),
            job_type=cfg.logger.job_type,
            tags=list(cfg.logger.tags) or None,
            config=config,
            dir=cfg.run_dir,
            id=run_id(cfg),
            resume="allow",
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    @property
    def run_dir(self) -> str:
        return self.run.dir

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def mark_preempting(self) -> None:
        """The job stops early to be requeued; the run resumes under the same id."""
        self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        offline_dir = os.path.dirname(self.run.dir) if self.mode == "offline" else None
        self.run.finish(exit_code=exit_code)
        if offline_dir:
            print(f"vptrain: W&B run saved offline; upload it with: wandb sync {offline_dir}", flush=True)
