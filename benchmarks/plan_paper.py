"""The paper's 8-GPU comparison as the cost model predicts it (not a measurement).

`vptrain plan` for the 1F1B 32-layer h=3072 model on 8 A100s (bf16, seq 2048, 128 microbatches of
1) over every method and vocabulary size: predicted MFU, bubble, compute imbalance between stages
and peak memory of the fullest stage. Useful to read next to the measured tables: it shows what the
same code expects at the paper's scale, where this machine cannot run.

    .venv/bin/python benchmarks/plan_paper.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _report import write_section
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vptrain.config import register_configs
from vptrain.plan import make_plan
from vptrain.validate import validate

REPO = Path(__file__).resolve().parent.parent
HEADING = "## The paper's 8-GPU setup, predicted by `vptrain plan` (cost model, not measured)"
METHODS = ["baseline", "redis", "interlaced", "vocab-1", "vocab-2"]
VOCABS = [32768, 65536, 131072, 262144]


def plan_row(method: str, vocab: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=["experiment=paper-1f1b-8gpu", f"method={method}",
                                            f"model.vocab_size={vocab}"])
    dcfg.run_dir = "/tmp/unused"
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    plan = make_plan(cfg)
    busy = plan.sim.busy
    return {
        "method": method,
        "vocab": vocab,
        "mfu": plan.mfu,
        "bubble": plan.sim.bubble_rate,
        "imbalance": max(busy) / min(busy),
        "peak_gib": max(s.memory_total for s in plan.stages) / 2**30,
        "iter_s": plan.sim.makespan,
    }


def main() -> None:
    register_configs()
    started = time.perf_counter()
    rows = [plan_row(m, v) for v in VOCABS for m in METHODS]
    command = ".venv/bin/python benchmarks/plan_paper.py"
    lines = [
        HEADING,
        "",
        "experiment=paper-1f1b-8gpu: 32 layers, h=3072, 24 heads, seq 2048, pp=8, 128 microbatches of 1, bf16, "
        "A100 profile (312 TFLOP/s). Predicted by the schedule simulator and cost model "
        "(vptrain/schedule/costs.py); these are not measurements. Reproduce "
        f"(≈ {time.perf_counter() - started:.0f} s): `{command}`",
        "",
        "| V | method | predicted MFU | bubble | busy max/min | peak GiB (fullest stage) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['vocab']} | {r['method']} | {100 * r['mfu']:.1f}% | {100 * r['bubble']:.1f}% | "
                     f"{r['imbalance']:.2f} | {r['peak_gib']:.1f} |")
    write_section(REPO / "docs/BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    for r in rows:
        print(f"V={r['vocab']:<7} {r['method']:<11} MFU {100 * r['mfu']:5.1f}%  bubble {100 * r['bubble']:5.1f}%  "
              f"imbalance {r['imbalance']:.2f}  peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())
