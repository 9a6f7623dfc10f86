"""Per-step metrics gathered to one logging rank: console, metrics.jsonl, summary.json, W&B.

Every rank measures its own busy time and memory; `gather_stage_stats` collects them so the
logging rank (global rank 0) can report them per pipeline stage under stable names
(`time/stage_<i>/busy_s`, `memory/stage_<i>/<kind>_bytes`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vptrain.config import RunConfig
from vptrain.console import PROGRESS_ENV, console_line, progress_marker
from vptrain.flops import peak_tflops, step_flops


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_stats(trainer, device: torch.device, busy_s: float) -> dict[str, Any]:
    mem = trainer.memory_bytes()
    if device.type == "cuda":
        mem["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        mem["peak_rss"] = peak_rss_bytes()
        mem["peak"] = sum(v for k, v in mem.items() if k != "peak_rss")
    take_instructions = getattr(trainer, "take_instruction_seconds", None)  # pipeline engines only
    return {
        "stage": trainer.stage,
        "dp": trainer.dp_rank,
        "busy_s": busy_s,
        "instr_s": take_instructions() if take_instructions is not None else {},
        "memory": mem,
        "params": trainer.num_parameters(),
    }


def gather_stage_stats(local: dict[str, Any], num_stages: int) -> list[dict[str, Any]]:
    """Per stage: the data-parallel replica with the most busy time (and memory) represents it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    else:
        everyone = [local]
    per_stage: list[dict[str, Any]] = [{} for _ in range(num_stages)]
    for s in everyone:
        cur = per_stage[s["stage"]]
        if not cur or s["busy_s"] > cur["busy_s"]:
            per_stage[s["stage"]] = s
    return per_stage


def truncate_rows(path: str, *, keep_steps: int) -> None:
    """Keep the rows of steps 1..keep_steps (optimizer steps done) in a metrics.jsonl (rewritten
    atomically); a torn last line (a crash mid-write) goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= keep_steps:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def logged_eval_losses(path: str) -> dict[int, float]:
    """step -> eval/loss of the rows a metrics.jsonl holds (a resumed run's summary keeps them)."""
    out: dict[int, float] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "eval/loss" in row:
                out[row["step"]] = row["eval/loss"]
    return out


def _median_after_first(values: list[float]) -> float:
    # The first step includes warm-up (allocations, p2p shape exchange): leave it out when possible.
    return statistics.median(values[1:] or values)


@dataclass
class RunMetrics:
    cfg: RunConfig
    is_logger: bool
    world_size: int
    wandb: Any = None
    losses: list[float] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)
    last_stages: list[dict[str, Any]] = field(default_factory=list)
    peak_by_stage: dict[int, dict[str, int]] = field(default_factory=dict)
    busy_by_stage: dict[int, list[float]] = field(default_factory=dict)  # stage -> busy seconds per step
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> eval/loss (train.eval_every)

    def __post_init__(self):
        # Asked by a local launcher on a terminal: one marker line per step for its progress bar.
        self.progress_markers = self.is_logger and os.environ.get(PROGRESS_ENV) == "1"
        self.tokens_per_step = self.cfg.train.global_batch_size * self.cfg.model.seq_len
        self.flops_per_step = step_flops(self.cfg)
        self.path = os.path.join(self.cfg.run_dir, "metrics.jsonl")

    def restore(self, losses: list[float]) -> None:
        """Continue the per-step record of a run resumed after len(losses) steps (none: a fresh
        start). metrics.jsonl keeps only the rows of those steps: the steps a crashed run did after
        its last checkpoint are redone, and must not be logged twice (nor a fresh run's in an
        older run's file)."""
        self.losses = list(losses)
        if self.is_logger:
            truncate_rows(self.path, keep_steps=len(losses))
            self.eval_losses = logged_eval_losses(self.path)

    def record(self, step: int, *, loss: float, lr: float, grad_norm: float | None, iter_s: float,
               stages: list[dict[str, Any]], eval_loss: float | None = None) -> dict[str, Any]:
        """One row per step; `eval_loss` when the step was followed by an eval (logged as eval/loss)."""
        self.losses.append(loss)
        self.iter_times.append(iter_s)
        self.last_stages = stages
        for s in stages:
            self.busy_by_stage.setdefault(s["stage"], []).append(s["busy_s"])
            best = self.peak_by_stage.setdefault(s["stage"], {})
            for kind, value in s["memory"].items():
                best[kind] = max(best.get(kind, 0), value)
        tflops = self.flops_per_step / iter_s / self.world_size / 1e12
        # `step` counts optimizer steps done (1 after the first), the same in the console,
        # metrics.jsonl and W&B; names follow the ecosystem's `section/name` convention.
        row: dict[str, Any] = {
            "step": step + 1,
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "time/iteration_s": iter_s,
            "throughput/tokens_per_s": self.tokens_per_step / iter_s,
            "throughput/tflops_per_device": tflops,
            "throughput/mfu": tflops / peak_tflops(self.cfg),
        }
        if eval_loss is not None:
            row["eval/loss"] = eval_loss
            self.eval_losses[step + 1] = eval_loss
        for s in stages:
            i = s["stage"]
            row[f"time/stage_{i}/busy_s"] = s["busy_s"]
            for kind, value in s.get("instr_s", {}).items():  # host time per instruction kind
                row[f"time/stage_{i}/instr_{kind}_s"] = value
            for kind, value in s["memory"].items():
                row[f"memory/stage_{i}/{kind}_bytes"] = value
        if self.is_logger:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])
            done = row["step"]
            if self.progress_markers:
                print(progress_marker(done, self.cfg.train.steps), flush=True)
            if done in (1, self.cfg.train.steps) or done % self.cfg.train.log_every == 0 or eval_loss is not None:
                self._print(row)
        return row

    def _print(self, row: dict[str, Any]) -> None:
        gn = "-" if row["train/grad_norm"] is None else f"{row['train/grad_norm']:.3f}"
        console_line(
            f"step {row['step']:>5}/{self.cfg.train.steps} | loss {row['train/loss']:.4f} | lr {row['train/lr']:.2e} "
            f"| gnorm {gn} | {row['throughput/tokens_per_s']:,.0f} tok/s "
            f"| {row['throughput/tflops_per_device']:.3f} TFLOP/s/dev | MFU {100 * row['throughput/mfu']:.2f}% "
            f"| {row['time/iteration_s'] * 1000:.0f} ms/it"
            + (f" | eval loss {row['eval/loss']:.4f}" if "eval/loss" in row else ""),
        )

    def summary(self) -> dict[str, Any]:
        med = _median_after_first(self.iter_times) if self.iter_times else float("nan")
        stages = []
        for s in self.last_stages:
            stages.append({
                "stage": s["stage"],
                "params": s["params"],
                "peak_memory_bytes": self.peak_by_stage.get(s["stage"], {}).get("peak", 0),
                "memory_bytes": self.peak_by_stage.get(s["stage"], {}),
                "busy_s_last_step": s["busy_s"],
                "busy_s_median": _median_after_first(self.busy_by_stage.get(s["stage"], [s["busy_s"]])),
            })
        return {
            "run_dir": self.cfg.run_dir,
            "experiment": self.cfg.experiment,
            "method": self.cfg.method.name,
            "schedule": self.cfg.schedule.name,
            "pp": self.cfg.layout.pp,
            "dp": self.cfg.layout.dp,
            "vocab_size": self.cfg.model.vocab_size,
            "precision": self.cfg.precision,
            "steps": len(self.losses),
            "losses": self.losses,
            "final_loss": self.losses[-1] if self.losses else None,
            "eval_losses": [[step, loss] for step, loss in sorted(self.eval_losses.items())],
            "final_eval_loss": self.eval_losses[max(self.eval_losses)] if self.eval_losses else None,
            "median_iter_time_s": med,
            "tokens_per_s": self.tokens_per_step / med if self.losses else None,
            "tflops_per_device": self.flops_per_step / med / self.world_size / 1e12 if self.losses else None,
            "mfu": (self.flops_per_step / med / self.world_size / 1e12) / peak_tflops(self.cfg)
            if self.losses else None,
            "stages": stages,
        }

    def print_stage_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Per-stage summary (last step busy time, peak memory over the run)")
        for col in ("stage", "params", "busy ms", "params MiB", "grads MiB", "optim MiB", "peak MiB", "RSS MiB"):
            table.add_column(col, justify="right")
        for s in self.last_stages:
            mem = self.peak_by_stage.get(s["stage"], {})
            mib = {k: f"{v / 2**20:.1f}" for k, v in mem.items()}
            table.add_row(str(s["stage"]), f"{s['params']:,}", f"{1000 * s['busy_s']:.1f}", mib.get("params", "-"),
                          mib.get("grads", "-"), mib.get("optimizer", "-"), mib.get("peak", "-"),
                          mib.get("peak_rss", "-"))
        # Off a terminal (a log file, Slurm's output) rich would fit the table to 80 columns and cut
        # the headers and numbers; there nothing limits the width.
        Console(file=sys.stdout, width=None if sys.stdout.isatty() else 10_000).print(table)
