"""A peer on the same work: torch.distributed.pipelining's `Schedule1F1B` (what torchtitan runs) on
vptrain's GPT, as rows of benchmarks/cpu_methods.py.

The same layers (vptrain/model.py), initialised from the same seed; the same output-layer kernel as
baseline (the vocabulary kernel on one shard, vptrain/vocab/one_shard.py); the same data, m
microbatches of the same size, fp32, and the same optimizer step (the fp64-norm clip summed over the
pipeline, AdamW, the LR schedule); gloo, one process per stage and one thread each. Only the
pipeline runtime differs: torch's PipelineStage and Schedule1F1B (dynamic shape inference on the first
step, batched isend/irecv, gradients scaled by 1/m after the last backward) instead of DeepSpeed's.
method=baseline runs baseline's layer split, method=redis torchtitan's remedy for the heavy last
stage, fewer layers there (redis's split); `--layers` gives a split of its own.

    .venv/bin/python benchmarks/_torch_peer.py --out peer.json experiment=cpu-bench method=redis ...

Writes, for rank 0's view of each step: the step's wall time, the loss, and per rank the split of
cpu_methods' table (busy, optimizer, waits, host, descheduled; vptrain/engine/step_clock.py's accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str], run_dir: str = "/tmp/vptrain-torch-peer"):
    """vptrain's own config for these overrides (conf/, the same as `vptrain train` composes)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vptrain.config import register_configs
    from vptrain.validate import validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose("config", overrides=list(overrides))
    node.run_dir = run_dir
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


class PeerStage(nn.Module):
    """One stage's layers of vptrain's GPT, registered under their global index (so parameter names
    are the single-process GPT's). The last stage holds the output layer but does not run it in
    forward: the schedule's loss_fn does (`PeerLoss`), as DeepSpeed's last stage does with OneShardLoss."""

    def __init__(self, layers: dict[int, nn.Module], head_index: int | None):
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)
        self.body = [str(i) for i in layers if i != head_index]
        self.head_index = head_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.body:
            x = self._modules[name](x)
        return x

    @property
    def head(self) -> nn.Module:
        return self._modules[str(self.head_index)]


class PeerLoss:
    """The schedule's loss_fn: the last stage's OutputLayer (hidden, weight) pair into the one-shard
    vocabulary kernel. Every rank passes one (torch's schedule runs no backward on a rank without a
    loss_fn); only the last stage calls it."""

    def __init__(self, stage: PeerStage, cfg, layout):
        from vptrain.vocab.one_shard import OneShardLoss

        self.stage = stage
        # As baseline's last stage builds it (engine/pipeline.plain_loss_fn): the plan's chunking.
        self.loss = OneShardLoss(cfg.model.vocab_size, chunk_tokens=layout.chunk_tokens,
                                 store_softmax=cfg.vocab.store_softmax)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.stage.head(x), labels)


def build_stage(cfg, layout, counts: list[int], stage: int) -> PeerStage:
    """Stage `stage` of the split `counts`: the embedding joins stage 0, final norm and head the last."""
    from vptrain.engine.common import gpt_shape
    from vptrain.model import layer_list

    # [InputEmbedding, Block x L, FinalNorm, OutputLayer]
    specs = layer_list(gpt_shape(cfg, vocab_rows=layout.vocab.rows), with_vocab=True)
    start = 0 if stage == 0 else 1 + sum(counts[:stage])
    end = 1 + sum(counts[: stage + 1]) + (2 if stage == len(counts) - 1 else 0)
    layers = {i: cls(*args) for i, (cls, args) in enumerate(specs) if start <= i < end}
    return PeerStage(layers, head_index=len(specs) - 1 if stage == len(counts) - 1 else None)


class Timed:
    """Seconds inside the wrapped callables (the stage's compute: forward, backward, loss), and the
    part of them spent descheduled (another process on the core)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.seconds = self.descheduled = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            wall0, _, queued0 = self.clock.read()
            try:
                return fn(*args, **kwargs)
            finally:
                wall1, _, queued1 = self.clock.read()
                self.seconds += wall1 - wall0
                self.descheduled += queued1 - queued0

        return timed


def _worker(rank: int, world: int, overrides: list[str], counts: list[int], port: int, out: str) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from vptrain.config import microbatches
    from vptrain.data import StepData
    from vptrain.engine.grad_norm import clip_grad_norm_fp64
    from vptrain.engine.step_clock import ThreadClock
    from vptrain.optim import build_optimizer, build_scheduler
    from vptrain.resolved import resolve_layout

    torch.set_num_threads(1)
    cfg = compose_config(overrides)
    layout = resolve_layout(cfg)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    torch.manual_seed(cfg.train.seed)  # the layers init from their own seeds; as the trainers do
    module = build_stage(cfg, layout, counts, rank)
    params = list(module.parameters())
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    m = microbatches(cfg)
    # Static shapes: torch's dynamic inference exchanges metadata and, on gloo in torch 2.13, hangs
    # between the last stage's backward-metadata send and the first stage's warm-up sends.
    b, t, h = cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.hidden_size
    hidden = torch.empty(b, t, h, requires_grad=True)  # requires_grad: the stage sends its input's gradient back
    stage = PipelineStage(module, rank, world, torch.device("cpu"),
                          input_args=torch.empty(b, t, dtype=torch.long) if rank == 0 else hidden,
                          output_args=hidden)
    last = rank == world - 1
    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=PeerLoss(module, cfg, layout))
    clock = ThreadClock()
    busy = Timed(clock)
    # Instance attributes: the stage and the schedule look these up on themselves per microbatch.
    stage.forward_maybe_with_nosync = busy.wrap(stage.forward_maybe_with_nosync)
    stage.backward_maybe_with_nosync = busy.wrap(stage.backward_maybe_with_nosync)
    schedule._compute_loss = busy.wrap(schedule._compute_loss)
    data = StepData(cfg)
    steps = []
    for step in range(cfg.train.steps):
        micro = data.microbatches(step, 0)
        tokens = torch.cat([t for t, _ in micro])  # the schedule splits dim 0 back into the m microbatches
        labels = torch.cat([lab for _, lab in micro])
        losses: list[torch.Tensor] = []
        busy.seconds = busy.descheduled = 0.0
        t0 = clock.read()
        schedule.step(*((tokens,) if rank == 0 else ()), target=labels if last else None,
                      losses=losses if last else None, return_outputs=False)
        t1 = clock.read()
        clip_grad_norm_fp64(params, cfg.train.grad_clip, groups=[None], device=torch.device("cpu"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # after the step, as DeepSpeed's engine does
        t2 = clock.read()
        loss = float(torch.stack(losses).detach().double().mean()) if last else None
        t3 = clock.read()
        steps.append({"loss": loss, **_split(t0, t1, t2, t3, busy.seconds),
                      "busy_on_cpu": max(0.0, busy.seconds - busy.descheduled)})
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"steps": steps, "memory": _bytes(params, optimizer)})
    if rank == 0:
        _write(out, counts, everyone)
    dist.barrier()
    dist.destroy_process_group()


def _split(t0, t1, t2, t3, busy: float) -> dict[str, float]:
    """One rank's step in cpu_methods' parts; each t is ThreadClock.read(): (wall, on-CPU, run queue)."""
    def blocked(a, b):
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1]) - (b[2] - a[2]))

    wait_p2p = blocked(t0, t1)  # the schedule blocks only in its p2p waits (no collective, dp=1)
    wait_drain = blocked(t1, t2)  # the norm's all-reduce: waiting for the other stage to drain
    optimizer = (t2[0] - t1[0]) - wait_drain
    step = t3[0] - t0[0]
    return {
        "step": step, "busy": busy, "optimizer": optimizer, "wait_p2p": wait_p2p, "wait_vocab": 0.0,
        "wait_drain": wait_drain, "host": step - busy - optimizer - wait_p2p - wait_drain,
        "descheduled": t3[2] - t0[2],
    }


def _bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    from vptrain.engine.common import optimizer_state_bytes, tensor_bytes

    out = {"params": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params),
           "optimizer": optimizer_state_bytes(optimizer)}
    out["peak"] = sum(out.values())  # as vptrain's metrics count a CPU stage's: what it holds after a step
    return out


def _write(out: str, counts: list[int], everyone: list[dict]) -> None:
    """The summary in the shape cpu_methods reads from a vptrain run: rank 0's step times and the
    medians of each rank's parts over the steps after the first (the first infers shapes)."""
    first, last = everyone[0]["steps"], everyone[-1]["steps"]
    iter_times = [s["step"] for s in first[1:]] or [first[0]["step"]]

    def medians(steps: list[dict]) -> dict[str, float]:
        kept = steps[1:] or steps
        return {k: statistics.median(s[k] for s in kept) for k in steps[0] if k != "loss"}

    summary = {
        "layers_per_stage": counts,
        "losses": [s["loss"] for s in last],
        "iter_times": iter_times,
        "median_iter_time_s": statistics.median(iter_times),
        "ranks": [medians(r["steps"]) for r in everyone],
        "stages": [{"stage": i, "memory_bytes": r["memory"], "peak_memory_bytes": r["memory"]["peak"]}
                   for i, r in enumerate(everyone)],
    }
    Path(out).write_text(json.dumps(summary, indent=2) + "\n")


PLAIN_METHODS = ("baseline", "redis")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_peer(overrides: list[str], out: Path, counts: list[int] | None = None) -> dict:
    """Spawn the pipeline's ranks, train, and return the summary (also written to `out`).

    method=baseline gives the plain split, method=redis torchtitan's remedy with redis's split
    (fewer layers on the last stage); either way the output layer runs the kernel that method runs.
    `counts` overrides the split."""
    from vptrain.resolved import resolve_layout

    cfg = compose_config(overrides)
    if cfg.method.name not in PLAIN_METHODS:
        raise ValueError(f"method={cfg.method.name}: the torch peer runs the plain pipeline; set method=baseline "
                         "(plain split) or method=redis (fewer layers on the last stage)")
    if cfg.layout.dp != 1 or cfg.precision != "fp32" or cfg.schedule.name != "1f1b":
        raise ValueError("the torch peer runs layout.dp=1, precision=fp32, schedule=1f1b only: set them so")
    counts = counts or list(resolve_layout(cfg).stage_layers)
    if len(counts) != cfg.layout.pp or sum(counts) != cfg.model.num_layers:
        raise ValueError(f"layers per stage {counts}: give layout.pp={cfg.layout.pp} counts summing to "
                         f"model.num_layers={cfg.model.num_layers}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(cfg.layout.pp, overrides, counts, free_port(), str(out)), nprocs=cfg.layout.pp)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="transformer layers per stage (default: the config's split)")
    parser.add_argument("overrides", nargs="*", help="vptrain config overrides, e.g. experiment=cpu-bench")
    args = parser.parse_args()
    summary = run_peer(args.overrides, args.out, args.layers)
    print(f"torch 1F1B {summary['layers_per_stage']}: {1000 * summary['median_iter_time_s']:.0f} ms/step, "
          f"losses {summary['losses']}")


if __name__ == "__main__":
    main()
