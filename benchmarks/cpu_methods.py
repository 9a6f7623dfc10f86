"""Every 1F1B method side by side on this CPU: pp=2, one thread per process, a small GPT with a
large vocabulary (experiment=cpu-bench: h=256, 4 layers, seq 128, 8 microbatches).

For each vocabulary size it trains every method for a few steps through the real `vptrain train`
(DeepSpeed pipeline, gloo) and the single-process reference, then reports the median iteration
time, the speedup over baseline, per-stage busy time, parameter and peak memory, and the ratio to
the ideal balanced pipeline: the single-process step time / p * (m + p - 1) / m, measured in the
same run.

    .venv/bin/python benchmarks/cpu_methods.py [--vocab 32768 65536] [--steps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import write_section

REPO = Path(__file__).resolve().parent.parent
METHODS = ["baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2"]
HEADING = "## Methods on a 2-stage CPU pipeline (issue 5)"


def train(run_dir: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vptrain.cli", "train", f"hydra.run.dir={run_dir}", "experiment=cpu-bench",
           "logger=none", "train.checkpoint_at_end=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    summary["busy_s"] = [statistics.median(r[f"time/stage_{s['stage']}/busy"] for r in rows)
                         for s in summary["stages"]]
    summary["iter_times"] = [r["iter_time_s"] for r in rows]
    return summary


def measure(vocab: int, steps: int, work: Path) -> dict:
    common = [f"model.vocab_size={vocab}", f"train.steps={steps}"]
    single = train(work / f"single-{vocab}", [*common, "layout.pp=1", "method=baseline"])
    pp, m = 2, 8
    ideal = single["median_iter_time_s"] / pp * (m + pp - 1) / m
    out = {"vocab": vocab, "single_step_s": single["median_iter_time_s"], "ideal_s": ideal, "methods": {}}
    for method in METHODS:
        s = train(work / f"{method}-{vocab}", [*common, f"method={method}", "layout.pp=2"])
        params = [st["memory_bytes"]["params"] for st in s["stages"]]
        out["methods"][method] = {
            "iter_s": s["median_iter_time_s"],
            "iter_times": s["iter_times"],
            "busy_s": s["busy_s"],
            "params_bytes": params,
            "peak_bytes": [st["peak_memory_bytes"] for st in s["stages"]],
            "param_imbalance": max(params) / min(params) - 1,
            "vs_ideal": s["median_iter_time_s"] / ideal,
        }
        print(f"V={vocab} {method:<12} {s['median_iter_time_s'] * 1000:7.0f} ms  x{s['median_iter_time_s'] / ideal:.2f}"
              f" of ideal, busy {[round(b * 1000) for b in s['busy_s']]} ms", flush=True)
    base = out["methods"]["baseline"]["iter_s"]
    for r in out["methods"].values():
        r["speedup_vs_baseline"] = base / r["iter_s"]
    return out


def markdown(results: list[dict], command: str, meta: dict) -> str:
    lines = [
        HEADING,
        "",
        "pp=2 on a 2-core x86_64 CPU (one process per stage, one thread each, gloo), experiment=cpu-bench: "
        "h=256, 4 layers, seq 128, 8 microbatches of 1 sequence, fp32, AdamW. Time: median over the steps "
        "after the first. Ideal = single-process step time / p × (m + p − 1) / m, measured in the same run. "
        "Busy = time in compute passes per step (median). Param MiB per stage: weights only.",
        "",
        "Reproduce (about 5 minutes):",
        "",
        "```",
        command,
        "```",
        "",
        "| V | method | ms / step | × baseline speed | × ideal | busy ms (stage 0 / 1) | params MiB (0 / 1) | "
        "param imbalance | peak MiB (0 / 1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for method, r in res["methods"].items():
            busy = " / ".join(f"{1000 * b:.0f}" for b in r["busy_s"])
            params = " / ".join(f"{b / 2**20:.1f}" for b in r["params_bytes"])
            peak = " / ".join(f"{b / 2**20:.1f}" for b in r["peak_bytes"])
            lines.append(f"| {res['vocab']} | {method} | {1000 * r['iter_s']:.0f} | {r['speedup_vs_baseline']:.2f} | "
                         f"{r['vs_ideal']:.2f} | {busy} | {params} | {100 * r['param_imbalance']:.1f}% | {peak} |")
        lines.append(f"| {res['vocab']} | single process | {1000 * res['single_step_s']:.0f} | | ideal "
                     f"{1000 * res['ideal_s']:.0f} ms | | | | |")
    lines += ["", *targets(results), "",
              f"Machine load (1-min average) before / after: {meta['load']}; wall time {meta['wall_s']} s.", ""]
    return "\n".join(lines)


VOCAB = ("interlaced", "vocab-naive", "vocab-1", "vocab-2")


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, checked against this run's numbers (so the doc says what was met)."""
    ok = {True: "met", False: "NOT met"}
    worst = max(r["methods"][m]["vs_ideal"] for r in results for m in VOCAB)
    largest = max(results, key=lambda r: r["vocab"])
    t = {m: largest["methods"][m]["iter_s"] for m in largest["methods"]}
    faster = {m: all(t[m] < t[o] for o in ("baseline", "redis", "interlaced")) for m in ("vocab-1", "vocab-2")}
    imbalance = max(r["methods"][m]["param_imbalance"] for r in results for m in VOCAB)
    return [
        "Targets (computed from this run):",
        f"- every vocabulary method within 15% of the ideal bound: worst {worst:.2f}× — {ok[worst <= 1.15]}. "
        "Ratios below 1 happen because the ideal is derived from the single-process model, whose output "
        "layer is `F.cross_entropy` on the full logits (autograd keeps logits, log-softmax and their "
        "gradient); the sharded layer works in one fp32 buffer in place and costs less (see the "
        "vocabulary-layer benchmark above).",
        *[f"- {m} faster than baseline, redis and interlaced at V={largest['vocab']}: {1000 * t[m]:.0f} ms vs "
          f"{1000 * t['baseline']:.0f} / {1000 * t['redis']:.0f} / {1000 * t['interlaced']:.0f} ms — {ok[faster[m]]}"
          for m in ("vocab-1", "vocab-2")],
        f"- per-stage parameter memory of the vocabulary methods within 10%: worst {100 * imbalance:.1f}% — "
        f"{ok[imbalance <= 0.10]}.",
        "- On two CPU processes a blocking collective costs microseconds, so the interlaced baseline "
        "(synchronous, no overlap) loses little here; what the table shows clearly is the last stage's "
        "bottleneck under baseline and redis (busy time) and its removal by every vocabulary method.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/cpu_methods.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs/BENCHMARKS.md")
    args = parser.parse_args()
    command = ".venv/bin/python benchmarks/cpu_methods.py" + "".join(f" {a}" for a in sys.argv[1:])
    started, load = time.perf_counter(), [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(v, args.steps, Path(tmp)) for v in args.vocab]
    load.append(round(os.getloadavg()[0], 2))
    meta = {"command": command, "wall_s": round(time.perf_counter() - started, 1), "load": load}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_section(args.markdown, HEADING, markdown(results, command, meta))
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
