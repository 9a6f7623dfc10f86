"""S + T of the vocabulary-parallel output layer in bf16 on one GPU, against the same GPU's GEMM rate.

One rank's shard as the paper sizes it: h=4096, V/p=32768 rows, 4096 tokens. The output layer
does three N x h x V/p GEMMs per microbatch (logits, ∇X or A = softmax·W, ∇W), so its ideal time is
3 GEMMs at the plain bf16 GEMM rate measured in the same run. Reports achieved TFLOP/s for each
algorithm and the fraction of the GEMM rate.

    .venv/bin/python benchmarks/gpu_output_layer.py            (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _report import write_section  # noqa: E402

from vptrain import vocab  # noqa: E402

HEADING = "## Output layer on one GPU (issue 5)"


class LocalComm:
    """A one-rank communicator: every collective is the identity (a single shard is the whole world
    for this measurement; the collectives' cost is not what it measures)."""

    rank, world_size = 0, 1

    def _done(self, *_, **__):
        return vocab.Done()

    def all_gather(self, output, tensor, *, async_op=False):
        output[0].copy_(tensor)
        return vocab.Done()

    all_reduce = broadcast = reduce = _done


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/gpu_output_layer.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_output_layer.py needs a CUDA GPU")
    dev, n, h, v = torch.device("cuda"), args.tokens, args.hidden, args.rows
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(v, h, device=dev) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=dev)
    shard = vocab.VocabShard(0, v, v)
    gemm_flops = 2.0 * n * h * v
    gemm_ms = time_ms(lambda: x @ w.t(), args.reps)
    gemm_tflops = gemm_flops / gemm_ms / 1e9
    comm = LocalComm()
    rows = [{"path": "gemm", "ms": gemm_ms, "tflops": gemm_tflops, "fraction_of_gemm": 1.0}]
    for algo in ("alg1", "alg2"):
        def step(algo=algo):
            state = vocab.output_s_pass(x, w, labels, shard, algo)
            vocab.stats_phase(state, comm).wait()
            if algo == "alg2":
                vocab.grad_input_phase(state, comm).wait()
            g = vocab.token_grad(labels, normalizer=n)
            vocab.output_t_pass(state, g)

        ms = time_ms(step, args.reps)
        tflops = 3 * gemm_flops / ms / 1e9
        rows.append({"path": f"S+T {algo}", "ms": ms, "tflops": tflops, "fraction_of_gemm": tflops / gemm_tflops})
    name = torch.cuda.get_device_name()
    command = ".venv/bin/python benchmarks/gpu_output_layer.py" + "".join(f" {a}" for a in sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": name, "command": command, "rows": rows}, indent=2) + "\n")
    lines = [HEADING, "", f"{name}, bf16, h={h}, V/p={v}, {n} tokens. Reproduce: `{command}`", "",
             "| path | ms | TFLOP/s | × GEMM rate |", "|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['ms']:.2f} | {r['tflops']:.1f} | {r['fraction_of_gemm']:.2f} |" for r in rows]
    write_section(REPO / "docs/BENCHMARKS.md", HEADING, "\n".join(lines) + "\n")
    for r in rows:
        print(f"{r['path']:<10} {r['ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s x{r['fraction_of_gemm']:.2f}")


if __name__ == "__main__":
    main()
