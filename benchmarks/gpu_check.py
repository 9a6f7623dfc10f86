"""The one-GPU check of what the CPU suite cannot measure (issue 9); prints a table, writes JSON.

(a) Output layer: S+T of the vocabulary-parallel output layer in bf16 at h=4096, V/p=32768, 4096
    tokens, against torch.mm of its three GEMMs (logits, ∇X or A, ∇W) in the same run. Target: at
    least 80% of the GEMM rate (the paper reports ~91% of linear scaling).
(b) Host syncs: a few pp=1 bf16 training steps of the real trainer (build_trainer) under
    torch.cuda.set_sync_debug_mode. A line may make the host wait once per step (the step's loss
    and gradient-norm read), never once per microbatch.
(c) NCCL: the process group initialised as vptrain does (one rank), each collective the vocabulary
    passes issue (broadcast, all_reduce sum/max, reduce, all_gather), timed, and the real phase
    functions of every algorithm on a ProcessGroupComm against autograd, their issue and wait under
    set_sync_debug_mode("error").

    .venv/bin/python benchmarks/gpu_check.py [--out PATH]   one CUDA GPU; about a minute, < 8 min
    .venv/bin/python benchmarks/gpu_check.py --cpu          the same code paths on CPU with small
                                                            shapes and gloo; judges nothing a CPU
                                                            cannot (what tests/unit runs)

Exit status: 0 when every judged check passes (or, without --cpu, when there is no CUDA device:
nothing is checked then, and nothing is written), 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _gpu_checks import Check, collectives, output_layer, sync_free_steps  # noqa: E402
from _report import write_section  # noqa: E402

HEADING = "## GPU check (issue 9)"
GPU = {
    "output": {"tokens": 4096, "hidden": 4096, "rows": 32768, "reps": 20},
    "model": {"model.vocab_size": 32768, "model.hidden_size": 1024, "model.num_layers": 4, "model.num_heads": 16,
              "model.seq_len": 512, "train.micro_batch_size": 2, "train.global_batch_size": 8},
    "collectives": {"tokens": 4096, "hidden": 1024, "rows": 8192, "reps": 20},
    "steps": 3,
}
CPU = {
    "output": {"tokens": 128, "hidden": 64, "rows": 512, "reps": 2},
    "model": {"model.seq_len": 32, "train.micro_batch_size": 1, "train.global_batch_size": 4},
    "collectives": {"tokens": 64, "hidden": 32, "rows": 256, "reps": 2},
    "steps": 2,
}


def run_checks(device: torch.device) -> list[Check]:
    sizes = GPU if device.type == "cuda" else CPU
    checks = output_layer(device, **sizes["output"])
    checks += sync_free_steps(device, sizes["model"], sizes["steps"])
    checks += collectives(device, **sizes["collectives"])
    return checks


def status(check: Check) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[check.ok]


def table(checks: list[Check]) -> str:
    """Markdown: the console prints it too."""
    rows = [("check", "result", "measured", "target")] + [(c.name, status(c), c.value, c.target) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([".venv/bin/python benchmarks/gpu_check.py", *sys.argv[1:]]),
    }


def report(checks: list[Check], env: dict) -> dict:
    return {**env, "passed": all(c.ok is not False for c in checks), "checks": [asdict(c) for c in checks]}


def docs_section(result: dict) -> str:
    return "\n".join([
        HEADING, "",
        f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, NCCL {result['nccl']}, "
        f"{result['date']}. Reproduce: `{result['command']}` (JSON: benchmarks/results/gpu_check.json). "
        "What (a), (b) and (c) check, and their targets: the docstring of benchmarks/gpu_check.py.", "",
        table([Check(**c) for c in result["checks"]]), "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run of the code paths on CPU (gloo, small shapes)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_check[_cpu].json)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available; nothing was checked and nothing written "
              "(--cpu runs the same code paths on CPU)", file=sys.stderr)
        return 0
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    checks = run_checks(device)
    result = report(checks, environment(device))
    out = args.out or REPO / "benchmarks/results" / ("gpu_check_cpu.json" if args.cpu else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(checks))
    print(f"gpu_check: {'all judged checks passed' if result['passed'] else 'FAILED'}; wrote {out}")
    if device.type == "cuda" and not args.no_docs:
        write_section(REPO / "docs/BENCHMARKS.md", HEADING, docs_section(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
