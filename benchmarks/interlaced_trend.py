"""Interlaced against the overlapped methods as the pipeline crosses nodes (cost model, not measured).

The paper's 1F1B models at 8, 16 and 32 A100s (pp = #GPUs, 8 GPUs per node, bf16, seq 2048,
128 microbatches of 1): `vptrain plan`'s predicted MFU of interlaced, vocab-1 and vocab-2 at each
vocabulary size, and interlaced's gap to the better overlapped method. The paper reports interlaced
slightly ahead on one node and behind once the pipeline spans nodes (vp_algorithms §5).

    .venv/bin/python benchmarks/interlaced_trend.py             # writes its section of docs/BENCHMARKS.md
    .venv/bin/python benchmarks/interlaced_trend.py --vocab 32768 --no-write
"""

from __future__ import annotations

import argparse
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
HEADING = "## Interlaced vs overlapped vocabulary methods across nodes (cost model, not measured)"
SIZES = [("paper-1f1b-8gpu", 8), ("paper-1f1b-16gpu", 16), ("paper-1f1b-32gpu", 32)]
METHODS = ["interlaced", "vocab-1", "vocab-2"]
VOCABS = [32768, 131072]


def predicted_mfu(experiment: str, method: str, vocab: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"experiment={experiment}", f"method={method}",
                                            f"model.vocab_size={vocab}"])
    dcfg.run_dir = "/tmp/unused"
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    plan = make_plan(cfg)
    return {"mfu": plan.mfu, "bubble": plan.sim.bubble_rate, "iter_s": plan.sim.makespan,
            "peak_in_flight": plan.sim.peak_in_flight[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=VOCABS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    register_configs()
    started = time.perf_counter()
    rows = []
    for experiment, gpus in SIZES:
        for vocab in args.vocab:
            mfu = {m: predicted_mfu(experiment, m, vocab) for m in METHODS}
            best = max(mfu["vocab-1"]["mfu"], mfu["vocab-2"]["mfu"])
            rows.append((gpus, vocab, mfu, mfu["interlaced"]["mfu"] - best))
            print(f"{gpus:>2} GPUs V={vocab:<7} " + "  ".join(f"{m} {100 * mfu[m]['mfu']:.1f}%" for m in METHODS)
                  + f"  interlaced - best overlapped {100 * rows[-1][3]:+.1f} pts", flush=True)
    command = ".venv/bin/python benchmarks/interlaced_trend.py"
    lines = [
        HEADING, "",
        "The paper's 1F1B models (gpt-4b pp=8, gpt-10b pp=16, gpt-21b pp=32; `experiment=paper-1f1b-{8,16,32}gpu`: "
        "cluster=a100, 8 GPUs per node, bf16, seq 2048, 128 microbatches of 1), predicted MFU from `vptrain plan`'s "
        "simulator and cost model, with the two-tier network of `vptrain/schedule/network.py` (NVLink 100 GB/s "
        "effective inside a node, one 200 Gb/s HDR NIC per GPU, 25 GB/s, across nodes). Predictions, not "
        f"measurements. Reproduce (≈ {time.perf_counter() - started:.0f} s): `{command}`", "",
        "| GPUs (nodes) | V | interlaced | vocab-1 | vocab-2 | interlaced − best overlapped "
        "| bubble interlaced / vocab-1 / vocab-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for gpus, vocab, mfu, gap in rows:
        bubbles = " / ".join(f"{100 * mfu[m]['bubble']:.1f}%" for m in METHODS)
        cells = " | ".join(f"{100 * mfu[m]['mfu']:.1f}%" for m in METHODS)
        lines.append(f"| {gpus} ({-(-gpus // 8)}) | {vocab} | {cells} | {100 * gap:+.1f} pts | {bubbles} |")
    def gap_at(gpus: int) -> float:  # at the first vocabulary size asked for
        return next(gap for g, _, _, gap in rows if g == gpus)

    lines += [
        "",
        "Against the paper (interlaced minus the better overlapped method, MFU points, s = 2048, V = 32k): the VP "
        "artifact measures +0.9 at 8 A100s on one node (interlaced 54.0%, vocab-1 53.1%; "
        "`artifact/example-results/full-exp.txt`), the paper's v1 Table 5 +0.8 / -0.1 / -3.5 at 8 / 16 / 32 GPUs "
        "(-1.1 / -3.3 averaged over V at 16 / 32); predicted here "
        f"{100 * gap_at(8):+.1f} / {100 * gap_at(16):+.1f} / {100 * gap_at(32):+.1f} at V = {rows[0][1]}. "
        "Interlaced is ahead on one node because its passes run alone: the overlapped methods' side-stream "
        "collectives slow their F and B (3.2% at the artifact's size; DeviceProfile.overlap_s_per_byte, measured "
        "from the artifact's per-pass times, see the calibration section), which outweighs interlaced's blocking "
        "collectives over NVLink. Across nodes those blocking collectives and the step-aligned transfers cross "
        "InfiniBand and interlaced falls behind. Without the overlap term (before it was added) the same plans "
        "put interlaced 1.0 point behind at 8 GPUs.",
        "",
        "What this does not show: these are the cost model's predictions, not runs (no GPU here). The overlap "
        "cost is one constant per device profile (seconds per collective byte), measured on one node (8 A100s, "
        "NVLink, h = 3072); across nodes NCCL's InfiniBand kernels may take fewer or more SMs, and no published "
        "per-pass time covers that, so it is assumed the same there and the 16/32-GPU gaps rest mostly on the "
        "network tier (the model's 16-GPU gap is wider than the paper's, its 32-GPU gap narrower: the paper has "
        "interlaced further behind on four nodes than on two, the model about as far). H100 reuses the A100's "
        "cost per byte (an assumption). The model still has no "
        "separate cost for vocab-1/vocab-2's softmax rescale or their extra kernel launches (the measured "
        "output-layer curve includes them), one p2p cost per pipeline (its slowest hop), and a single-rail "
        "inter-node tier (one NIC per GPU); real NCCL rings over several NICs can do better. Interlaced keeps "
        "2p − 1 microbatches in flight on stage 0 here (the reference: 1.5p), see docs/schedules.md; its memory "
        "is not compared in this table.",
    ]
    if not args.no_write:
        write_section(REPO / "docs/BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
