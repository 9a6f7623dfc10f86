"""Every schedule x method at the paper's 8- and 16-GPU sizes, as the cost model predicts it (issue 13).

`vptrain plan` for experiment=paper-1f1b-8gpu / -16gpu with schedule=<each of kinds.SCHEDULE_NAMES> and
every method the schedule runs: predicted bubble, peak activation memory of the fullest rank (what the
engine keeps alive: F -> W under a split backward, plus the output gradients W needs) and iteration
time. Writes benchmarks/results/plan_schedules.md (docs/BENCHMARKS.md takes the table from there).

    .venv/bin/python benchmarks/plan_schedules.py [--vocab 131072]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vptrain.config import register_configs
from vptrain.plan import make_plan
from vptrain.schedule.kinds import SCHEDULE_KINDS
from vptrain.validate import validate

REPO = Path(__file__).resolve().parent.parent
SIZES = ("paper-1f1b-8gpu", "paper-1f1b-16gpu")
METHODS = ("baseline", "redis", "interlaced", "vocab-1", "vocab-2")


def plan_row(experiment: str, schedule: str, method: str, vocab: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"experiment={experiment}", f"schedule={schedule}", f"method={method}",
                                            f"model.vocab_size={vocab}"])
    dcfg.run_dir = "/tmp/unused"
    cfg = OmegaConf.to_object(dcfg)
    row = {"size": experiment.rsplit("-", 1)[1], "schedule": schedule, "method": method}
    try:
        validate(cfg)
        plan = make_plan(cfg)
    except (ValueError, AssertionError) as err:  # a schedule its builder cannot make yet: say so in the table
        return {**row, "error": str(err).splitlines()[0][:80]}
    return {**row, "bubble": plan.sim.bubble_rate, "act_gib": max(s.memory["activations"] for s in plan.stages) / 2**30,
            "iter_s": plan.sim.makespan, "mfu": plan.mfu}


def table(rows: list[dict]) -> list[str]:
    lines = ["| GPUs | schedule | method | bubble | peak activations GiB (fullest rank) | iteration s | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['schedule']} | {r['method']} | n/a: {r['error']} | | | |")
        else:
            lines.append(f"| {r['size']} | {r['schedule']} | {r['method']} | {100 * r['bubble']:.1f}% | "
                         f"{r['act_gib']:.2f} | {r['iter_s']:.2f} | {100 * r['mfu']:.1f}% |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=131072)
    args = parser.parse_args()
    register_configs()
    started = time.perf_counter()
    rows = [plan_row(size, name, method, args.vocab) for size in SIZES for name, kind in SCHEDULE_KINDS.items()
            for method in METHODS if method in kind.methods]
    header = (f"Predicted by `vptrain plan` (cost model, A100 bf16, seq 2048, 128 microbatches of 1, V={args.vocab}); "
              f"not measured. Reproduce (≈ {time.perf_counter() - started:.0f} s): "
              f"`.venv/bin/python benchmarks/plan_schedules.py --vocab {args.vocab}`")
    text = "\n".join([header, "", *table(rows)]) + "\n"
    out = REPO / "benchmarks/results/plan_schedules.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
