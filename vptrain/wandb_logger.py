"""Weights & Biases on the logging rank: offline unless an API key is configured (WANDB_MODE in
the environment overrides both). A run resumed from a checkpoint continues the W&B run whose id
the checkpoint recorded; every other run is a new W&B run.

The key is only ever read from the environment or wandb's own login; it is never copied into
the config, a log line, or a file vptrain writes.
"""

from __future__ import annotations

import netrc
import os
import secrets
from typing import TYPE_CHECKING, Any

from vptrain.config import RunConfig

if TYPE_CHECKING:
    from vptrain.resolved import ResolvedPlan


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


# WANDB_MODE values wandb accepts, with its two legacy spellings.
ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}


def resolve_mode(cfg: RunConfig, environ: dict[str, str] | None = None) -> str:
    """WANDB_MODE in the environment wins over logger.mode and over a configured key: it is how
    a user or a cluster keeps a job off the network (a compute node with no route out)."""
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        if env_mode not in ENV_MODES:
            raise ValueError(f"WANDB_MODE={environ['WANDB_MODE']}: use online, offline or disabled "
                             f"(or unset it to follow logger.mode)")
        return ENV_MODES[env_mode]
    if cfg.logger.mode == "auto":
        return "online" if api_key_configured() else "offline"
    return cfg.logger.mode


def new_run_id() -> str:
    """A fresh W&B run id. Only a run resumed from a checkpoint reuses one (the id saved in the
    checkpoint's meta.json): a new run in an old directory must not append to the old W&B run."""
    return secrets.token_hex(8)


def run_name(cfg: RunConfig) -> str:
    if cfg.logger.run_name:
        return cfg.logger.run_name
    relevant = [o for o in cfg.overrides if not o.startswith(("hydra.", "logger", "experiment="))]
    return ",".join(relevant) or cfg.experiment


def run_tags(cfg: RunConfig) -> list[str]:
    """What a W&B table filters by: the method, schedule and layout, then logger.tags."""
    own = [f"method:{cfg.method.name}", f"schedule:{cfg.schedule.name}", f"pp:{cfg.layout.pp}", f"dp:{cfg.layout.dp}"]
    return own + [t for t in cfg.logger.tags if t not in own]


def run_group(cfg: RunConfig) -> str:
    """logger.group, which the CLI fills in for a multirun (experiment + sweep), else the experiment."""
    if cfg.logger.group:
        return cfg.logger.group
    return cfg.experiment


def derived_layout(cfg: RunConfig, world_size: int, plan: ResolvedPlan | None = None) -> dict[str, Any]:
    """What the YAML does not say but a comparison needs: layers and vocabulary rows per stage and
    which global rank runs which (stage, data-parallel replica), from the resolved plan."""
    from vptrain.resolved import resolve_layout

    lay = plan.layout if plan is not None else resolve_layout(cfg)
    rows = [{"input": r.embedding_rows[1] - r.embedding_rows[0], "output": r.output_rows[1] - r.output_rows[0]}
            for r in lay.ranks]
    return {
        "world_size": world_size,
        "microbatches": lay.num_microbatches,
        "padded_vocab_size": lay.vocab.rows,
        "layers_per_stage": list(lay.stage_layers),
        "vocab_rows_per_stage": rows,
        # vptrain numbers ranks stage-fastest: rank = dp_index * pp + stage.
        "rank_map": {str(c.rank): {"stage": c.pp, "dp": c.dp} for c in lay.rank_map if c.rank < world_size},
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def run_config(cfg: RunConfig, resolved: dict[str, Any], plan: ResolvedPlan | None = None) -> dict[str, Any]:
    """The W&B config: the resolved run config, the derived layout under `derived` and the summary
    of the plan the run executes under `plan` (what `vptrain plan` prints; schedule_sha1 is the
    digest of its schedule.txt)."""
    out = {**resolved, "derived": derived_layout(cfg, cfg.layout.pp * cfg.layout.dp, plan)}
    if plan is not None:
        out["plan"] = plan.summary()
    return out


class WandbLogger:
    def __init__(self, cfg: RunConfig, *, config: dict[str, Any], resume_id: str | None = None):
        """resume_id: the W&B run id of the checkpoint this run resumes from (continue that W&B
        run); None starts a new W&B run."""
        import wandb

        self.mode = resolve_mode(cfg)
        self.run_id = resume_id or new_run_id()
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=run_group(cfg),
            name=run_name(cfg),
            job_type=cfg.logger.job_type,
            tags=run_tags(cfg),
            config=config,
            dir=cfg.run_dir,
            id=self.run_id,
            # "allow", not "must": the earlier attempt may have been offline and never synced.
            resume="allow" if resume_id else None,
            mode=self.mode,
            settings=wandb.Settings(
                console="wrap" if cfg.logger.console else "off",
                silent=True,
                x_disable_stats=cfg.logger.system_metrics_interval_s <= 0,
                **({"x_stats_sampling_interval": cfg.logger.system_metrics_interval_s}
                   if cfg.logger.system_metrics_interval_s > 0 else {}),
            ),
        )

    def log_schedule(self, cfg: RunConfig, plan: ResolvedPlan) -> str:
        """The schedule this run executes as a picture (run_dir/schedule.png, as `vptrain plan`
        draws it), logged once at step 0, before the first step's row (W&B's media panel)."""
        import wandb

        from vptrain.schedule import render_png, simulate

        path = os.path.join(cfg.run_dir, "schedule.png")
        render_png(plan.schedule, simulate(plan.schedule, plan.costs, rules=plan.rules), path)
        self.run.log({"plan/schedule": wandb.Image(path, caption="schedule.png: the passes each rank runs")}, step=0)
        return path

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
