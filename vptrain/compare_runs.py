"""What `vptrain compare` reads: runs (measured, `summary.json`) and plans (`plan.json`, from
`vptrain plan -m ...`), named by the overrides that vary between them, and repeats of one point
(the same overrides but `train.seed`) gathered into one `Point` with a median and a spread.

A measured run also gets the plan's prediction for its own config (vptrain/plan.py, pure): the
per-stage busy time the cost model expects beside the one measured.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vptrain.config import METHODS

SKIP_DIRS = {"wandb", "checkpoints", ".submitit", ".hydra", "logs", "params", "passes", "init_from"}
# Overrides that do not change what is compared (where a run writes, how it logs) or that make
# repeats of one point (the seed).
IGNORED_OVERRIDE_PREFIXES = ("hydra.", "logger", "launcher.", "train.record_passes", "train.dump_params")
REPEAT_KEYS = ("train.seed",)


@dataclass
class Run:
    path: str
    kind: str  # "measured" (summary.json) or "planned" (plan.json)
    method: str
    schedule: str
    pp: int
    dp: int
    model: str
    vocab_size: int
    overrides: dict[str, str]
    steps_done: int = 0
    steps_planned: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    mfu: float | None = None
    iter_s: float | None = None
    stage_peaks: list[float] = field(default_factory=list)
    stage_busy: list[float] = field(default_factory=list)
    plan_iter_s: float | None = None  # the plan's prediction (for a measured run: of its own config)
    plan_busy: list[float] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.kind == "planned" or self.steps_done >= self.steps_planned


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.lstrip("+~").partition("=")
        if not key.startswith(IGNORED_OVERRIDE_PREFIXES):
            out[key] = value
    return out


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _load_config(path: Path):
    """The run's resolved config; None (with a warning) when it is missing or from a schema this
    vptrain does not read (an older version's run): the run is compared without the plan's figures."""
    from omegaconf.errors import OmegaConfBaseException

    from vptrain.config import load

    if not path.exists():
        return None
    try:
        return load(str(path))
    except (OmegaConfBaseException, ValueError) as err:
        print(f"vptrain compare: {path} does not load ({type(err).__name__}: {str(err).splitlines()[0]}); "
              f"comparing that run without its plan", file=sys.stderr)
        return None


def _measured(run_dir: Path, root: Path, memo) -> Run:
    s = json.loads((run_dir / "summary.json").read_text())
    cfg = _load_config(run_dir / "config.yaml")
    stages = s.get("stages", [])
    run = Run(
        path=os.path.relpath(run_dir, root), kind="measured", method=s.get("method", "?"),
        schedule=s.get("schedule", "?"), pp=int(s.get("pp", 0)), dp=int(s.get("dp", 0)),
        model=cfg.model.name if cfg else "?", vocab_size=int(s.get("vocab_size", 0)),
        overrides=_overrides(cfg.overrides if cfg else _hydra_overrides(run_dir)),
        steps_done=int(s.get("steps", len(s.get("losses", [])))),
        steps_planned=cfg.train.steps if cfg else int(s.get("steps", 0)),
        losses=list(s.get("losses", [])), tokens_per_s=s.get("tokens_per_s"), mfu=s.get("mfu"),
        iter_s=s.get("median_iter_time_s"),
        stage_peaks=[float(st.get("peak_memory_bytes", 0)) for st in stages],
        stage_busy=[float(st.get("busy_s_median", st.get("busy_s_last_step", 0.0))) for st in stages],
    )
    if cfg is not None:
        from vptrain.plan import make_plan

        plan = make_plan(cfg, memo=memo)  # repeats and sweeps share schedules: built once
        run.plan_iter_s, run.plan_busy = plan.sim.makespan, [float(b) for b in plan.sim.busy]
    return run


def _planned(run_dir: Path, root: Path) -> Run:
    d = json.loads((run_dir / "plan.json").read_text())
    c, sched = d["config"], d["schedule"]
    tokens = c["microbatches"] * c["micro_batch_size"] * c["dp"] * c["seq"]
    iter_s = sched["predicted_iteration_seconds"]
    return Run(
        path=os.path.relpath(run_dir, root), kind="planned", method=c["method"], schedule=c["schedule"],
        pp=int(c["pp"]), dp=int(c["dp"]), model=c["model"], vocab_size=int(c["vocab"]),
        overrides=_overrides(_hydra_overrides(run_dir)), tokens_per_s=tokens / iter_s if iter_s > 0 else None,
        mfu=sched["mfu"], iter_s=iter_s, stage_peaks=[float(st["memory_bytes"]["total"]) for st in d["stages"]],
        stage_busy=[float(b) for b in sched["busy_seconds"]], plan_iter_s=iter_s,
        plan_busy=[float(b) for b in sched["busy_seconds"]],
    )


def find_runs(root: Path) -> list[Run]:
    """Every run directory under root: summary.json (a training run) or plan.json (a plan)."""
    from vptrain.schedule.memo import ScheduleMemo

    runs, memo = [], ScheduleMemo()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if "summary.json" in filenames:
            runs.append(_measured(Path(dirpath), root, memo))
        elif "plan.json" in filenames:
            runs.append(_planned(Path(dirpath), root))
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (r.kind, order.get(r.method, len(order)), r.method, r.schedule, r.pp, r.dp,
                             r.vocab_size, r.path))
    return runs


def varying_overrides(runs: list[Run]) -> list[str]:
    """The override keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def run_name(run: Run, varying: list[str]) -> str:
    """What tells the run apart from the others: `method=vocab-2,model.vocab_size=65536`."""
    parts = [f"{k}={run.overrides[k]}" for k in varying if k in run.overrides and k not in REPEAT_KEYS]
    # Nothing but the seed varies: every run is a repeat of one point.
    return ",".join(parts) or f"{run.method} on {run.schedule}"


@dataclass
class Spread:
    median: float
    low: float
    high: float
    n: int

    @staticmethod
    def of(values: list[float | None]) -> Spread | None:
        xs = [v for v in values if v is not None]
        return Spread(statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None


def _stage_medians(lists: list[list[float]]) -> list[float]:
    lists = [x for x in lists if x]
    if not lists:
        return []
    return [statistics.median(x[i] for x in lists if i < len(x)) for i in range(max(map(len, lists)))]


@dataclass
class Point:
    """One point of the comparison: a run, or the repeats of one (same overrides, other seeds)."""

    name: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def spread(self, attr: str) -> Spread | None:
        return Spread.of([getattr(r, attr) for r in self.runs])

    @property
    def stage_busy(self) -> list[float]:
        return _stage_medians([r.stage_busy for r in self.runs])

    @property
    def stage_peaks(self) -> list[float]:
        return _stage_medians([r.stage_peaks for r in self.runs])

    @property
    def plan_busy(self) -> list[float]:
        return _stage_medians([r.plan_busy for r in self.runs])

    @property
    def losses(self) -> list[float]:
        """The median loss of the repeats at each step they all ran."""
        steps = min(len(r.losses) for r in self.runs)
        return [statistics.median(r.losses[i] for r in self.runs) for i in range(steps)]


def balance(per_stage: list[float]) -> float | None:
    """max / min over the stages: 1.0 is a balanced pipeline."""
    return max(per_stage) / min(per_stage) if per_stage and min(per_stage) > 0 else None


def points(runs: list[Run]) -> list[Point]:
    varying = varying_overrides(runs)
    out: dict[tuple[str, str], Point] = {}
    for r in runs:
        name = run_name(r, varying)
        out.setdefault((r.kind, name), Point(name, [])).runs.append(r)
    return list(out.values())
