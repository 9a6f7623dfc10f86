"""Output layer: vocabulary-parallel algorithms and options vs the unsharded F.cross_entropy path.

    .venv/bin/python benchmarks/vocab_layers.py  # writes benchmarks/results/vocab_layers.json and
                                                 # the "Vocabulary layers (issue 3)" section of docs/BENCHMARKS.md
    .venv/bin/python benchmarks/vocab_layers.py --chunks  # the time cost of vocab.chunk_tokens, fp32 and
                                                 # bf16: results/vocab_chunks.json, "Output-layer chunks (issue 9)"

For p = 1 and p = 2 gloo processes (1 intra-op thread each, so p=2 uses both cores of these
machines), times one microbatch's forward + backward of the output layer: for the sharded layer
S, the collective phases, loss and g, T and the ∇X reduction (vptrain.vocab.output_layer_step);
for the baseline `F.cross_entropy(x @ W.T, y).backward()` on the whole table in one process.
Peak memory is the peak of live tensor bytes allocated during the step (tracked at the dispatcher,
so it works on CPU; inputs and weights excluded), max over ranks. Times are the median (and min) over
--reps rounds (configs run round-robin, after a warm-up each) of the slowest rank's time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _report import write_section
from torch.utils._python_dispatch import TorchDispatchMode

from vptrain.schedule.costs import CHUNK_MULTIPLE, CHUNK_TRANSIENT_SHARE, ModelShape, default_chunk_tokens
from vptrain.vocab import ALGOS, ProcessGroupComm, VocabShard, output_layer_step, padded_vocab_rows

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Vocabulary layers (issue 3)"
CHUNK_SECTION = "## Output-layer chunks (issue 9)"
CHUNK_FRACTIONS = (0, 16, 8, 4)  # chunk_tokens = N / fraction (0: one chunk)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated by ops while active (views/in-place: no new bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.refs:
                if key in inputs or storage.nbytes() == 0:
                    continue  # a view of, or in place on, memory that existed before the step
                self.sizes[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                self.refs[key] = 0
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def _configs(tokens: int) -> list[dict]:
    chunk = tokens // 8
    out = [dict(path="unsharded", algo=None, chunk_tokens=0, store_softmax=True)]
    out += [dict(path="vocab", algo=a, chunk_tokens=0, store_softmax=True) for a in ALGOS]
    for algo in ("alg1", "alg2"):
        for chunk_tokens, store in ((0, False), (chunk, True), (chunk, False)):
            out.append(dict(path="vocab", algo=algo, chunk_tokens=chunk_tokens, store_softmax=store))
    return out


def _chunk_configs(tokens: int) -> list[dict]:
    """Chunk sizes against one chunk, for both stored and recomputed softmax, fp32 and bf16 weights."""
    return [dict(path="vocab", algo=algo, chunk_tokens=tokens // f if f else 0, store_softmax=store, dtype=dtype)
            for dtype in ("float32", "bfloat16") for algo in ("alg1", "alg2") for store in (True, False)
            for f in CHUNK_FRACTIONS]  # fmt: skip


def _rank_main(rank: int, p: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=p, timeout=timedelta(seconds=600)
    )
    comm = ProcessGroupComm()
    gen = torch.Generator().manual_seed(0)
    vocab, hidden, n = args.vocab, args.hidden, args.tokens
    # Model-like scales (layer-normed hidden, 0.02 init): the logits stay O(1). Unit-scale weights
    # would push most softmax entries into fp32 denormals, which slow CPU GEMMs ~50x.
    x = torch.randn(n, hidden, generator=gen)
    weight = torch.randn(padded_vocab_rows(vocab, p), hidden, generator=gen) * 0.02
    labels = torch.randint(0, vocab, (n,), generator=gen)
    shard = VocabShard.of(vocab, p, rank)
    w_shard = weight[shard.start : shard.end].clone()
    steps = []
    for cfg in _chunk_configs(n) if args.chunks else _configs(n):
        if cfg["path"] == "unsharded" and p > 1:
            continue  # the baseline is the single-process path; measured in the p=1 group
        if cfg["path"] == "unsharded":
            xb = x.clone().requires_grad_()
            wb = weight[:vocab].clone().requires_grad_()

            def step(xb=xb, wb=wb) -> None:
                F.cross_entropy(xb @ wb.t(), labels).backward()
                xb.grad = wb.grad = None

        else:

            dtype = getattr(torch, cfg.get("dtype", "float32"))
            x_in, w_in = x.to(dtype), w_shard.to(dtype)

            def step(cfg=cfg, xd=x_in, wd=w_in) -> None:
                output_layer_step(
                    xd, wd, labels, shard, comm, cfg["algo"], loss_normalizer=n,
                    chunk_tokens=cfg["chunk_tokens"], store_softmax=cfg["store_softmax"],
                )  # fmt: skip

        steps.append((cfg, step))
    peaks = []
    for _, step in steps:  # warm-up runs measure memory; timed runs go untracked
        tracker = PeakTensorBytes()
        dist.barrier()
        with tracker:
            step()
        peak = torch.tensor([tracker.peak], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the fullest rank
        peaks.append(int(peak.item()))
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.reps):  # round-robin, so a burst of load from other jobs spreads over configs
        for i, (_, step) in enumerate(steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
            times[i].append(elapsed.item())
    rows = [
        {**cfg, "p": p, "time_s": statistics.median(ts), "time_min_s": min(ts), "times_s": ts, "peak_bytes": peak}
        for (cfg, _), ts, peak in zip(steps, times, peaks, strict=True)
    ]
    if rank == 0:
        with open(os.path.join(out_dir, f"p{p}.pkl"), "wb") as f:
            pickle.dump(rows, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as out_dir:
        for p in (1,) if args.chunks else (1, 2):
            mp.spawn(_rank_main, args=(p, _free_port(), args, out_dir), nprocs=p)
            with open(os.path.join(out_dir, f"p{p}.pkl"), "rb") as f:
                rows += pickle.load(f)
    for r in rows:
        # Against the unsharded path, or (--chunks) against the same configuration in one chunk.
        base = next(q for q in rows if q["path"] == "unsharded") if not args.chunks else next(
            q for q in rows if q["chunk_tokens"] == 0 and all(q[k] == r[k] for k in ("algo", "store_softmax", "dtype")))
        r["time_ratio"] = r["time_s"] / base["time_s"]
        r["time_min_ratio"] = r["time_min_s"] / base["time_min_s"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def _head(section: str, intro: str, reproduce: str, command: str, columns: str) -> list[str]:
    """A section's first lines: its title, what was measured, how to reproduce it, the table header."""
    return [section, "", intro, "", f"Reproduce ({reproduce}):", "", "```", command, "```", "", columns,
            "|" + "---|" * columns.count(" | ") + "---|"]


def chunk_markdown(rows: list[dict], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    lines = _head(
        CHUNK_SECTION,
        f"The time cost of `vocab.chunk_tokens`: one microbatch of the output layer (S, statistics, loss, g, T, as "
        f"`vptrain.vocab.output_layer_step`), N={args.tokens} tokens, h={args.hidden}, V={args.vocab}, one rank "
        f"(p=1), 1 thread, {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}. Every "
        "ratio is against the same configuration in one chunk, measured in the same run (median of "
        f"{args.reps} rounds, configurations round-robin). bf16: bf16 weights and activations, fp32 "
        "accumulation (on CPU through fp32 copies of the bf16 operands, taken in blocks; on CUDA the GEMM "
        f"writes fp32 itself). 1-minute load average {load[0]} before, {load[1]} after, on 2 shared cores.",
        "about 2 minutes on 2 cores",
        command,
        "| dtype | algo | store_softmax | chunk_tokens | ms: median (min) | × one chunk: median (min) | peak MiB "
        "| × one chunk |",
    )
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['algo']} | {r['store_softmax']} | {r['chunk_tokens']} | "
            f"{1000 * r['time_s']:.0f} ({1000 * r['time_min_s']:.0f}) | {r['time_ratio']:.2f} "
            f"({r['time_min_ratio']:.2f}) | {r['peak_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
        )
    chunked = [r for r in rows if r["chunk_tokens"] > 0]
    lines.append("")
    for store in (True, False):
        part = [r["time_min_ratio"] for r in chunked if r["store_softmax"] == store]
        mem = [r["memory_ratio"] for r in chunked if r["store_softmax"] == store]
        lines.append(
            f"- store_softmax={store}: chunks of N/16 to N/4 tokens take {min(part):.2f}–{max(part):.2f}× the "
            f"one-chunk time (ratio of the fastest rounds, the least disturbed by other jobs), at "
            f"{min(mem):.2f}–{max(mem):.2f}× its peak."
        )
    # What the plan picks when vocab.chunk_tokens is unset, for two paper-sized microbatches (bf16, 80 GiB).
    big = ModelShape(vocab=262144, vocab_rows=262144, layers=32, hidden=3072, seq=2048, micro_batch=8, act_bytes=2)
    paper = ModelShape(vocab=262144, vocab_rows=262144, layers=32, hidden=3072, seq=2048, micro_batch=1, act_bytes=2)
    picked = default_chunk_tokens(big, p=2, act_bytes=2, memory_bytes=80 * 2**30)
    paper_picked = default_chunk_tokens(paper, p=8, act_bytes=2, memory_bytes=80 * 2**30)
    lines.append(
        f"- When `vocab.chunk_tokens` is left unset, the plan picks the largest multiple of {CHUNK_MULTIPLE} "
        f"tokens whose transient logits (fp32, plus their bf16 copy under bf16) fit "
        f"1/{round(1 / CHUNK_TRANSIENT_SHARE)} of `cluster.gpu_memory_gb`, or one chunk when the whole microbatch fits "
        f"(`vptrain plan` prints the choice). bf16 on 80 GiB: {picked or 'one chunk'} tokens for the 4B model "
        f"at pp=2, V=256k, 8 sequences of 2048 per microbatch; "
        f"{'one chunk' if paper_picked == 0 else paper_picked} at the paper's 8-GPU setting (pp=8, 1 sequence)."
    )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    lines = _head(
        SECTION,
        f"Output layer, one microbatch forward + backward: N={args.tokens} tokens, h={args.hidden}, "
        f"V={args.vocab}, fp32, {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, gloo, "
        "1 thread per rank. "
        "`unsharded` is `F.cross_entropy(x @ W.T, y).backward()` in one process; the vocab rows run "
        "`vptrain.vocab.output_layer_step` (S, collective phases, loss, g, T, ∇X reduction) on each of "
        "p ranks holding V/p rows. Time: median (and min) over "
        f"{args.reps} rounds of the slowest rank's time, configurations run round-robin after a warm-up "
        "each. Peak: live tensor bytes allocated during the "
        "step (dispatcher-level tracking; inputs and weights excluded), fullest rank. Ratios are against "
        "`unsharded`. The machine is shared with other jobs: single runs can be slowed by their load, "
        f"which is why the min is shown too (1-minute load average {load[0]} before this run, {load[1]} "
        "after, on 2 cores).",
        "from the repository root, after `make setup`; 1.5–2 min on 2 cores",
        command,
        "| p | path | chunk_tokens | store_softmax | time ms: median (min) | × unsharded | peak MiB | × unsharded |",
    )
    for r in rows:
        name = r["algo"] or r["path"]
        lines.append(
            f"| {r['p']} | {name} | {r['chunk_tokens']} | {r['store_softmax']} | "
            f"{1000 * r['time_s']:.0f} ({1000 * r['time_min_s']:.0f}) | {r['time_ratio']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
        )
    lines += ["", *_reading(rows)]
    return "\n".join(lines) + "\n"


def _reading(rows: list[dict]) -> list[str]:
    """A few sentences computed from this run's figures (no hand-edited numbers)."""

    def pick(p: int, chunk: bool, store: bool) -> list[dict]:
        return [r for r in rows if r["path"] == "vocab" and r["p"] == p
                and (r["chunk_tokens"] > 0) == chunk and r["store_softmax"] == store]  # fmt: skip

    p1 = pick(1, False, True)
    lo, hi = min(r["time_ratio"] for r in p1), max(r["time_ratio"] for r in p1)
    recompute = [r["time_ratio"] / next(q["time_ratio"] for q in p1 if q["algo"] == r["algo"])
                 for r in pick(1, False, False)]  # fmt: skip
    bounded = pick(1, True, False)
    chunked = [r["time_ratio"] / next(q["time_ratio"] for q in p1 if q["algo"] == r["algo"])
               for r in pick(1, True, True)]  # fmt: skip
    p2 = pick(2, False, True)
    p2_lo, p2_hi = min(r["time_ratio"] for r in p2), max(r["time_ratio"] for r in p2)
    p2_mem = max(r["memory_ratio"] for r in p2)
    return [
        f"- p=1, default options: {lo:.2f}–{hi:.2f}× the unsharded time (target ≤ 1.10×). The same three "
        "GEMMs run, but the softmax, its gradient and the one-hot are fused in place into one fp32 "
        "[N, V/p] buffer, where autograd's path materialises logits, log-softmax and their gradient. "
        "That path's time also varies more from run to run (it allocates ~3× the bytes per step: fresh "
        "pages, under other jobs' load), so the ratio moves between runs (see the load averages above).",
        f"- `store_softmax=False` recomputes the shard's logits in T (a fourth GEMM): "
        f"{min(recompute):.2f}–{max(recompute):.2f}× the time of keeping the softmax. On its own it does not "
        "lower the peak, because S and T each still build all N rows of logits at once; with "
        f"`chunk_tokens` it bounds the fp32 buffer to one chunk: peak {bounded[0]['memory_ratio']:.2f}× "
        "the unsharded path (the rest is ∇W and ∇X).",
        f"- `chunk_tokens` with the softmax kept: {min(chunked):.2f}–{max(chunked):.2f}× the time without "
        "chunks and the same peak, since the stored softmax is [N, V/p] anyway; only transients shrink.",
        f"- p=2 (each rank holds half the rows): default options take {p2_lo:.2f}–{p2_hi:.2f}× the "
        f"unsharded time and {p2_mem:.2f}× its peak. The two ranks need both cores of this machine and "
        "share them with other jobs, so differences between algorithms at p=2 mostly reflect that load "
        "(a rank that waits in a blocking collective while the other is descheduled); they do the same "
        "FLOPs. This checks cost and memory, not GPU scaling.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/vocab_layers.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs/BENCHMARKS.md")
    parser.add_argument("--chunks", action="store_true", help="measure the time cost of vocab.chunk_tokens")
    args = parser.parse_args()
    if args.chunks and args.json == parser.get_default("json"):
        args.json = REPO / "benchmarks/results/vocab_chunks.json"
    command = ".venv/bin/python benchmarks/vocab_layers.py" + "".join(f" {a}" for a in sys.argv[1:])
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = run(args)
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
            "reps": args.reps, "dtype": "float32,bfloat16" if args.chunks else "float32", "threads_per_rank": 1,
            "torch": torch.__version__,
            "wall_s": round(time.perf_counter() - started, 1), "load_avg_1min_before_after": load}  # fmt: skip
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    if args.chunks:
        write_section(args.markdown, CHUNK_SECTION, chunk_markdown(rows, args, command, load))
    else:
        write_section(args.markdown, SECTION, markdown(rows, args, command, load))
    for r in rows:
        print(f"p={r['p']} {r.get('dtype', '')} {r['algo'] or r['path']:<10} chunk={r['chunk_tokens']:<4} "
              f"store={r['store_softmax']!s:<5} "
              f"{1000 * r['time_s']:7.0f} ms x{r['time_ratio']:.2f}  {r['peak_bytes'] / 2**20:7.1f} MiB "
              f"x{r['memory_ratio']:.2f}")  # fmt: skip
    print(f"wrote {args.json} and {args.markdown} in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
