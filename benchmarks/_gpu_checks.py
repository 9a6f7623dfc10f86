"""The three checks of gpu_check.py. Each returns `Check` rows; on CPU (--cpu) the same code runs
with small shapes and gloo, and what only a GPU can judge (rates, host syncs) is reported, not judged."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vptrain import vocab

REPO = Path(__file__).resolve().parent.parent
TARGET_FRACTION = 0.8  # of the plain GEMM rate; the paper reports ~91% of linear scaling


@dataclass
class Check:
    name: str
    ok: bool | None  # None: measured or skipped, not judged
    value: str
    target: str = ""
    detail: dict = field(default_factory=dict)


class Timer:
    """Milliseconds per call: CUDA events on a GPU (no host sync between calls), the clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def ms(self, fn, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) * 1e3 / reps
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps


class LocalComm:
    """One shard is the whole vocabulary: every collective is the identity. (a) measures the
    layer's kernels, not communication."""

    rank, world_size = 0, 1

    def all_gather(self, output, tensor, *, async_op=False):
        output[0].copy_(tensor)
        return vocab.Done()

    def all_reduce(self, tensor, op="sum", *, async_op=False):
        return vocab.Done()

    def broadcast(self, tensor, src, *, async_op=False):
        return vocab.Done()

    def reduce(self, tensor, dst, *, async_op=False):
        return vocab.Done()


# ---- (a) the output layer against the GEMM rate --------------------------------------------------
def output_layer(device: torch.device, *, tokens: int, hidden: int, rows: int, reps: int) -> list[Check]:
    """S+T in bf16 against torch.mm of its three GEMMs: logits X·Wᵀ, ∇X (or A) = D·W, ∇W = Dᵀ·X."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(rows, hidden, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, rows, (tokens,), device=device, generator=gen)
    d = torch.randn(tokens, rows, device=device, generator=gen).to(torch.bfloat16)
    shard, timer = vocab.VocabShard(0, rows, rows), Timer(device)
    gemm_ms = sum(timer.ms(fn, reps) for fn in (lambda: x @ w.t(), lambda: d @ w, lambda: d.t() @ x))
    checks = [Check("(a) 3 plain bf16 GEMMs", None, f"{gemm_ms:.2f} ms",
                    detail={"ms": gemm_ms, "tflops": 3 * 2.0 * tokens * hidden * rows / gemm_ms / 1e9})]
    for algo in ("alg1", "alg2"):
        def step(algo=algo):
            vocab.output_layer_step(x, w, labels, shard, LocalComm(), algo, loss_normalizer=tokens)

        ms = timer.ms(step, reps)
        fraction = gemm_ms / ms
        judged = fraction >= TARGET_FRACTION if device.type == "cuda" else None
        checks.append(Check(f"(a) S+T {algo}, bf16", judged, f"{fraction:.2f} of GEMM rate ({ms:.2f} ms)",
                            f">= {TARGET_FRACTION:.2f}", {"ms": ms, "fraction_of_gemm": fraction}))
    return checks


# ---- (b) training steps free of host syncs -------------------------------------------------------
def run_config(overrides: dict, run_dir: str):
    from omegaconf import OmegaConf

    from vptrain.config import RunConfig
    from vptrain.validate import validate

    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(dotlist),
                             {"run_dir": run_dir, "logger": {"name": "none"}})
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _sync_sites(records) -> Counter:
    """Where (file:line) each synchronising call of a step came from."""
    sites: Counter = Counter()
    for r in records:
        if "synchroniz" in str(r.message):
            path = Path(r.filename)
            sites[f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{r.lineno}"] += 1
    return sites


def sync_free_steps(device: torch.device, model: dict, steps: int) -> list[Check]:
    """pp=1 bf16 steps of the real trainer. set_sync_debug_mode("warn") names every line that makes
    the host wait; a line may do so once per step (the step's loss / grad-norm read), never per
    microbatch. ("error" would stop at the step's one legitimate read.)"""
    from vptrain.data import StepData
    from vptrain.train import build_trainer

    with tempfile.TemporaryDirectory(prefix="vptrain-gpu-check-") as run_dir:
        cfg = run_config({"method.name": "baseline", "layout.pp": 1, "precision": "bf16", "cluster.device": device.type,
                          "train.steps": steps + 1, **model}, run_dir)
        trainer = build_trainer(cfg, device, 0)
        data = StepData(cfg)
        trainer.train_step(data.microbatches(0, 0))  # warm-up: allocations, library handles
        m = len(data.microbatches(0, 0))
        per_step, losses = [], []
        for step in range(1, steps + 1):
            micro = data.microbatches(step, 0)  # CPU tensors, as the training loop hands them over
            if device.type != "cuda":
                losses.append(trainer.train_step(micro).loss)
                continue
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    losses.append(trainer.train_step(micro).loss)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            per_step.append(_sync_sites(records))
    detail = {"microbatches": m, "losses": losses, "syncs_per_step": [dict(s) for s in per_step]}
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    if device.type != "cuda":
        return [Check("(b) pp=1 bf16 steps, host syncs", None if finite else False,
                      f"{steps} steps ran (sync check needs CUDA)", "<= 1 per line per step", detail)]
    worst = max((n for sites in per_step for n in sites.values()), default=0)
    total = max((sum(sites.values()) for sites in per_step), default=0)
    return [Check("(b) pp=1 bf16 steps, host syncs", finite and worst <= 1,
                  f"{total} per step, most from one line: {worst} (m={m})", "<= 1 per line per step", detail)]


# ---- (c) NCCL and the vocabulary collectives -------------------------------------------------------
def _reference(x, w, labels, normalizer):
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy(xr @ wr.t(), labels, reduction="sum", ignore_index=vocab.IGNORE_INDEX) / normalizer
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def collectives(device: torch.device, *, tokens: int, hidden: int, rows: int, reps: int) -> list[Check]:
    """vptrain's process-group init on one rank, each collective the vocabulary passes issue, and
    every algorithm's phases on a ProcessGroupComm against autograd (fp32)."""
    from vptrain.engine.vocab_trainer import vocab_groups
    from vptrain.launch.env import LaunchEnv
    from vptrain.launch.local import free_port
    from vptrain.train import init_process_group

    with tempfile.TemporaryDirectory(prefix="vptrain-gpu-check-") as run_dir:
        cfg = run_config({"method.name": "baseline", "layout.pp": 1, "cluster.device": device.type,
                          "train.collective_timeout_s": 120},
                         run_dir)
    port = free_port()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    store = dist.TCPStore("127.0.0.1", port, world_size=1, is_master=True, timeout=timedelta(seconds=60))
    start = time.perf_counter()
    spec = init_process_group(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", port), device, store)
    try:
        comm = vocab.ProcessGroupComm(vocab_groups(cfg, spec.timeout)[0])
        probe = torch.ones(1, device=device)
        comm.all_reduce(probe).wait()  # NCCL creates its communicator on the first collective
        if device.type == "cuda":
            torch.cuda.synchronize()
        init_ms = (time.perf_counter() - start) * 1e3
        checks = [Check(f"(c) {spec.backend} init + first collective", probe.item() == 1.0, f"{init_ms:.0f} ms",
                        detail={"ms": init_ms, "env": spec.env, "timeout_s": spec.timeout.total_seconds()})]
        checks += _raw_collectives(comm, device, tokens, hidden, reps)
        checks += _phases(comm, device, tokens, hidden, rows)
        return checks
    finally:
        dist.destroy_process_group()


def _raw_collectives(comm, device, n: int, h: int, reps: int) -> list[Check]:
    timer, out = Timer(device), []
    cases = {  # as the engine issues them: tensor, and the call
        "broadcast x [N,h] bf16": (torch.randn(n, h, device=device).to(torch.bfloat16),
                                   lambda t: comm.broadcast(t, 0, async_op=True)),
        "all_reduce sum ∇X [N,h] fp32": (torch.randn(n, h, device=device),
                                         lambda t: comm.all_reduce(t, "sum", async_op=True)),
        "all_reduce max [N] fp32": (torch.randn(n, device=device), lambda t: comm.all_reduce(t, "max", async_op=True)),
        "reduce [N,h] fp32 to rank 0": (torch.randn(n, h, device=device), lambda t: comm.reduce(t, 0, async_op=True)),
    }
    for name, (tensor, issue) in cases.items():
        before = tensor.clone()
        issue(tensor).wait()
        ms = timer.ms(lambda issue=issue, tensor=tensor: issue(tensor).wait(), reps)
        out.append(Check(f"(c) {name}", torch.equal(tensor, before), f"{ms * 1e3:.0f} us", detail={"ms": ms}))
    stats = torch.randn(3, n, device=device)
    gathered = stats.new_empty(1, 3, n)
    comm.all_gather(gathered, stats, async_op=True).wait()
    ms = timer.ms(lambda: comm.all_gather(gathered, stats, async_op=True).wait(), reps)
    out.append(Check("(c) all_gather stats [3,N] fp32", torch.equal(gathered[0], stats), f"{ms * 1e3:.0f} us",
                     detail={"ms": ms}))
    return out


def _without_host_sync(fn, device: torch.device):
    """(fn(), "") or (None, the first line of the error). On CUDA under set_sync_debug_mode("error"):
    issuing and waiting on a collective, and the passes around them, must not make the host wait."""
    try:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        return fn(), ""
    except RuntimeError as err:
        return None, str(err).splitlines()[0]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def _phases(comm, device, n: int, h: int, rows: int) -> list[Check]:
    """Each algorithm's S, phases (async collectives) and T, then the embedding's reduce and
    broadcast, against autograd; each runs once to warm up, then once under the sync check."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, h, device=device, generator=gen)
    w = torch.randn(rows, h, device=device, generator=gen) * 0.02
    labels = torch.randint(0, rows, (n,), device=device, generator=gen)
    shard = vocab.VocabShard(0, rows, rows)
    ref_loss, ref_dx, ref_dw = _reference(x, w, labels, n)
    target = "< 1e-4, no host sync" if device.type == "cuda" else "< 1e-4"
    out = []
    for algo in vocab.ALGOS:
        def run(algo=algo):
            return vocab.output_layer_step(x, w, labels, shard, comm, algo, loss_normalizer=n, async_op=True)

        run()
        result, error = _without_host_sync(run, device)
        if result is None:
            out.append(Check(f"(c) phases {algo}", False, error, target))
            continue
        errs = {"loss": _rel_err(result.loss, ref_loss), "grad_x": _rel_err(result.grad_x, ref_dx),
                "grad_w": _rel_err(result.grad_w, ref_dw)}
        worst = max(errs.values())
        out.append(Check(f"(c) phases {algo}", worst < 1e-4, f"rel err {worst:.1e}", target, errs))

    def embedding():
        partial = vocab.input_forward(labels, w, shard)
        vocab.embed_reduce(partial, comm, dst=0, async_op=True).wait()
        vocab.grad_broadcast(partial, comm, 0, async_op=True).wait()
        return partial

    embedding()
    emb, error = _without_host_sync(embedding, device)
    exact = emb is not None and torch.equal(emb, w[labels])
    out.append(Check("(c) embed_reduce + grad_broadcast", exact, error or ("exact" if exact else "differs"),
                     target.replace("< 1e-4", "exact")))
    return out
