"""Schedules x methods on this CPU: pp=2, one process per stage, one thread each, the cpu-bench GPT
(h=256, 4 layers, seq 128, 8 microbatches, V=32768 unless --vocab). Per schedule (1f1b, zb-h1,
vhalf, interleaved with v=2) and method (baseline, vocab-1, vocab-2): the iteration time, the
bubble measured against the run's own pass times, and each rank's peak live activation bytes
(vptrain/engine/activation_meter.py) beside the plan's figure for it. Every row runs the same
kernels (DESIGN.md invariant 9). A pair the engine cannot run is reported with its error, not left out.

    .venv/bin/python benchmarks/cpu_schedules.py [--vocab 32768] [--steps 5] [--schedules ...] [--methods ...]
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

REPO = Path(__file__).resolve().parent.parent
SCHEDULES = ("1f1b", "zb-h1", "vhalf", "interleaved")
METHODS = ("baseline", "vocab-1", "vocab-2")
PP = 2
HEADING = "## Schedules side by side on a CPU pipeline"


def worker(rank: int, overrides: list[str], steps: int, out: str, port: str) -> None:
    """One rank: `steps` steps, the first a warm-up, the last metered (the meter's Python is kept
    out of the timed steps); rank{rank}.json with its times and bytes."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _torch_peer import compose_config

    from vptrain.data import StepData
    from vptrain.engine.activation_meter import meter_for
    from vptrain.plan import make_plan
    from vptrain.train import build_trainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(PP))
    dist.init_process_group("gloo", rank=rank, world_size=PP)
    try:
        cfg = compose_config(overrides, run_dir=os.path.join(out, "run"))
        plan = make_plan(cfg)
        trainer = build_trainer(cfg, torch.device("cpu"), rank, plan.resolved)
        data = StepData(cfg)
        rows = []
        for step in range(steps - 1):
            micro = data.microbatches(step, 0)
            trainer.take_busy_seconds(), trainer.take_instruction_seconds()
            started = time.perf_counter()
            trainer.train_step(micro)
            wall = time.perf_counter() - started
            clock = trainer.take_instruction_seconds()
            rows.append({"wall": wall, "busy": trainer.take_busy_seconds(), "step": clock["step"] or wall,
                         "optimizer_work": clock["optimizer"] - clock["blocked_optimizer"],
                         "blocked": clock["step_blocked"]})
        meter = meter_for(trainer)
        micro = data.microbatches(steps - 1, 0)
        meter.exclude(t for pair in micro for t in pair)
        with meter:
            trainer.train_step(micro)
        report = meter.report()
        timed = rows[1:] or rows
        result = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
        result.update(peak_bytes=report.peak_bytes, peak_at=report.peak_at,
                      plan_activation_bytes=plan.stages[rank].memory["activations"],
                      plan_bubble=plan.sim.bubble_rate, in_flight=plan.stages[rank].peak_in_flight)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        # Tear down together, as the trainer does (train.run_on_rank): a rank that destroys its gloo
        # context while its peer still uses it can abort at exit ("terminate called without an
        # active exception", seen once on vhalf vocab-2).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_pair(schedule: str, method: str, vocab: int, steps: int, work: Path) -> dict:
    out = work / f"{schedule}-{method}"
    out.mkdir(parents=True)
    overrides = ["experiment=cpu-bench", "logger=none", f"model.vocab_size={vocab}", f"layout.pp={PP}",
                 f"method={method}", f"schedule.name={schedule}", "train.checkpoint_at_end=false"]
    from vptrain.launch.local import free_port

    port = str(free_port())
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), "--port", port, "--out", str(out),
                               "--steps", str(steps), "--", *overrides], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(PP)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        lines = [line for log in logs for line in log.splitlines() if "Error" in line]
        if not lines:  # no Python error: a signal (negative code) or an exit without a message
            tails = [next((ln for ln in reversed(log.splitlines()) if "WARNING" not in ln), "") for log in logs]
            lines = [f"exit codes {[p.returncode for p in procs]}; last lines {tails}"]
        return {"error": lines[-1][:300]}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(PP)]
    # The pipeline's part of each rank's step: its train_batch less the optimizer's own work (which
    # runs after the drain, outside the bubble); idle = that span less the rank's compute in passes.
    # Of that span: blocked on a peer (the bubble: the step clock's blocked time, gloo's waits sleep),
    # computing in passes (busy), and the rest host overhead (Python, issuing operations).
    span = sum(r["step"] - r["optimizer_work"] for r in ranks)
    busy, blocked = sum(r["busy"] for r in ranks) / span, sum(r["blocked"] for r in ranks) / span
    return {"iter_s": ranks[0]["wall"], "bubble": blocked, "busy_share": busy, "host_share": 1 - busy - blocked,
            "plan_bubble": ranks[0]["plan_bubble"], "ranks": ranks}


def _ratio(row: dict, other: dict) -> str:
    return f"{row['iter_s'] / other['iter_s']:.2f}" if "iter_s" in other else "–"


def markdown(results: dict, meta: dict) -> str:
    lines = [
        HEADING, "",
        f"pp={PP} on a {os.cpu_count()}-core CPU, one process per stage and one thread each (gloo), "
        f"experiment=cpu-bench at V={meta['vocab']}: h=256, 4 layers, seq 128, 8 microbatches of 1 sequence, fp32. "
        "Time: rank 0's median step, warm-up and metered steps left out (--rounds: the fastest run's). "
        "Bubble: of the ranks' pipeline time (each rank's step less the optimizer's own work), the share "
        "blocked waiting for a peer (the step clock's accounting, vptrain/engine/step_clock.py); busy: the share "
        "computing in passes (this run's own pass times); host: the rest (Python, issuing gloo operations); "
        "beside the bubble, the plan's simulated one (cost-model pass times, no host overhead). "
        "Activations: each rank's peak live bytes in one metered "
        "step (what autograd saves, weights and the input batch left out, plus DeepSpeed's held input and "
        "output buffers; vptrain/engine/activation_meter.py) ÷ the plan's `activations` figure for it.", "",
        f"Reproduce (about {max(1, round(meta['wall_s'] / 60))} minutes): `{meta['command']}`", "",
        "| schedule | method | ms / step | × 1f1b (same method) | × baseline (same schedule) | bubble (plan) "
        "| busy / host | peak activations MiB (0 / 1) | measured ÷ plan (0 / 1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for schedule, row in results.items():
        for method, r in row.items():
            if "error" in r:
                lines.append(f"| {schedule} | {method} | not run: {r['error']} | | | | | | |")
                continue
            ref = results.get("1f1b", {}).get(method, {})
            base = row.get("baseline", {})
            mib = " / ".join(f"{k['peak_bytes'] / 2**20:.1f}" for k in r["ranks"])
            vs = " / ".join(f"{k['peak_bytes'] / k['plan_activation_bytes']:.3f}" for k in r["ranks"])
            lines.append(f"| {schedule} | {method} | {1000 * r['iter_s']:.0f} | {_ratio(r, ref)} | {_ratio(r, base)} | "
                         f"{r['bubble']:.3f} ({r['plan_bubble']:.3f}) | "
                         f"{r['busy_share']:.2f} / {r['host_share']:.2f} | {mib} | {vs} |")
    lines += [
        "", "What these figures do not show:",
        f"- A quiet machine: 1-min load {meta['load'][0]} before, {meta['load'][1]} after; 2 ranks on "
        f"{os.cpu_count()} cores shared with other jobs, medians of a few steps of one run each.",
        "- GPUs: no device memory statistics (the meter counts tensors, not the allocator's blocks, "
        "fragmentation or workspace) and no overlap of communication with compute.",
        "- Scale: pp=2 only; the plan's predictions at the paper's sizes are in the sections above.",
        "- The vocabulary methods' own buffers (softmax, statistics): measured separately against the plan's "
        "vocabulary column (tests/distributed/test_vocab_memory.py), not in the activation columns.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="runs per pair, round-robin; the fastest is reported")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/cpu_schedules.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "benchmarks/results/cpu_schedules.md")
    args, overrides = parser.parse_known_args()
    if args.worker is not None:
        worker(args.worker, [o for o in overrides if o != "--"], args.steps, args.out, args.port)
        return
    command = ".venv/bin/python benchmarks/cpu_schedules.py" + "".join(f" {a}" for a in sys.argv[1:])
    started, load = time.perf_counter(), [round(os.getloadavg()[0], 2)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):  # round-robin: a burst of other jobs' load does not hit one pair only
            for schedule in args.schedules:
                for method in args.methods:
                    r = run_pair(schedule, method, args.vocab, args.steps, Path(tmp) / str(n))
                    old = results.setdefault(schedule, {}).get(method)
                    if old is None or "error" in old or ("iter_s" in r and r["iter_s"] < old["iter_s"]):
                        results[schedule][method] = r
                    ratios = [round(k["peak_bytes"] / k["plan_activation_bytes"], 3) for k in r.get("ranks", [])]
                    print(schedule, method, r.get("error") or f"{1000 * r['iter_s']:.0f} ms, bubble {r['bubble']:.3f}, "
                          f"activations / plan {ratios}", flush=True)
    load.append(round(os.getloadavg()[0], 2))
    meta = {"command": command, "wall_s": round(time.perf_counter() - started, 1), "load": load, "vocab": args.vocab}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    args.markdown.write_text(markdown(results, meta))
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
