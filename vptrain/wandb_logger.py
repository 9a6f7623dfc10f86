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
    if cfg.logger.group:
        return cfg.logger.group
    return cfg.experiment


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

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
