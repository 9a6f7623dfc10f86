"""`vptrain plan`: what a run would look like, without starting a process group.

    vptrain plan model=gpt-4b layout.pp=8 model.vocab_size=262144 method=vocab-2 cluster=a100
    vptrain plan -m method=baseline,redis,vocab-1,vocab-2      # one plan per job, one summary line each

Prints the resolved plan (vptrain/resolved.py: the one the trainer executes and W&B logs): the
config (short), the rank map, a per-stage table (layers, vocabulary rows,
parameters, memory by kind, compute per step), the validated schedule grid, and the simulated bubble
rate, iteration time and MFU for `cluster.profile`; warns when a stage exceeds
`cluster.gpu_memory_gb`. Writes plan.json, schedule.txt and schedule.png into the run directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from vptrain.config import RunConfig
from vptrain.layout import RankLayout
from vptrain.resolved import GIB, ResolvedPlan, costed_schedule, layout_pass_costs, resolve, resolve_layout
from vptrain.schedule import (
    PassCosts,
    PassKind,
    Schedule,
    SimResult,
    render_ascii,
    render_png,
    simulate,
)
from vptrain.schedule.costs import (
    device_profile,
    model_flops,
    parameter_count,
    pass_flops,
    recompute_transient_bytes,
    state_bytes,
    vocab_buffer_bytes,
)
from vptrain.schedule.kinds import schedule_kind
from vptrain.schedule.memo import ScheduleMemo

MEMORY_KINDS = ("params", "grads", "optimizer", "activations", "vocab_buffers")


@dataclass(frozen=True)
class StagePlan:
    layout: RankLayout
    parameters: int
    memory: dict[str, float]
    flops: float
    busy_s: float
    peak_in_flight: int

    @property
    def memory_total(self) -> float:
        return sum(self.memory[k] for k in MEMORY_KINDS)


@dataclass(frozen=True)
class Plan:
    """The resolved plan (what runs) and what the planner predicts for it."""

    resolved: ResolvedPlan
    sim: SimResult
    stages: list[StagePlan]
    mfu: float
    warnings: list[str]

    @property
    def cfg(self) -> RunConfig:
        return self.resolved.cfg

    @property
    def schedule(self) -> Schedule:
        return self.resolved.schedule

    @property
    def iteration_s(self) -> float:
        return self.sim.makespan


def chunk_tokens_of(cfg: RunConfig) -> int:
    """vocab.chunk_tokens as the run uses it: the resolved plan's (vptrain.resolved)."""
    return resolve_layout(cfg).chunk_tokens


def run_pass_costs(cfg: RunConfig) -> PassCosts:
    """The cost model's seconds per pass for this config: the resolved plan's costs."""
    return layout_pass_costs(cfg, resolve_layout(cfg))


def planned_schedule(cfg: RunConfig, costs: PassCosts | None = None) -> Schedule:
    """The schedule a run executes: the resolved plan's (vptrain.resolved.resolve); with `costs`,
    the one the same builder makes from those costs instead."""
    return resolve(cfg).schedule if costs is None else costed_schedule(cfg, costs)


def make_plan(cfg: RunConfig, *, memo: ScheduleMemo | None = None) -> Plan:
    """The resolved plan of `cfg` with its simulation and memory; pure, starts nothing. `memo`
    (schedule/memo.py): schedules already built in the same loop of plans (the search's)."""
    resolved = resolve(cfg, check_deadlock=False, memo=memo)  # simulate() proves deadlock freedom
    lay, schedule, costs = resolved.layout, resolved.schedule, resolved.costs
    p, m, shape = cfg.layout.pp, lay.num_microbatches, lay.shape
    device = device_profile(cfg.cluster.profile)
    chunk_layers = [r.layers for r in lay.ranks]
    sim = simulate(schedule, costs, rules=resolved.rules)
    loss_place = lay.stages.loss_place
    flops = pass_flops(shape, method=cfg.method.name, p=p, chunk_layers=chunk_layers, loss_place=loss_place,
                       split=schedule_kind(cfg.schedule.name).split_backward)
    loss_rank, loss_chunk = loss_place
    out, warnings = [], []
    for r, rank in enumerate(lay.ranks):
        params = parameter_count(
            shape,
            layers=rank.num_layers,
            embedding_rows=rank.embedding_rows[1] - rank.embedding_rows[0],
            output_rows=rank.output_rows[1] - rank.output_rows[0],
            positions=rank.position_embedding,
            final_norm=rank.final_norm,
        )
        memory = state_bytes(
            params, precision=cfg.precision, optimizer=cfg.optim.name, zero_stage=cfg.optim.zero_stage, dp=cfg.layout.dp
        )
        # Recompute rebuilds one layer's activations inside a backward, beside everything in flight.
        memory["activations"] = sim.peak_activation[r] + (recompute_transient_bytes(shape) if rank.num_layers else 0.0)
        loss_held = _chunk_peak(schedule, r, loss_chunk) if r == loss_rank else 0
        # Vocabulary methods: every buffer timed over the schedule (schedule/memory.py).
        memory["vocab_buffers"] = float(sim.peak_vocab_bytes[r]) if sim.peak_vocab_bytes else vocab_buffer_bytes(
            shape, method=cfg.method.name, p=p, in_flight_vocab=sim.peak_vocab_in_flight[r], loss_in_flight=loss_held
        )
        step_flops = sum(flops[r].get((a.kind, a.chunk), 0.0) for a in schedule.ranks[r] if a.kind.is_compute)
        stage = StagePlan(rank, params, memory, step_flops, sim.busy[r], sim.peak_in_flight[r])
        if stage.memory_total > cfg.cluster.gpu_memory_gb * GIB:
            lean = "; schedule.w_reserve=0 keeps the fewest W's waiting" if (
                cfg.schedule.name == "zb-h1" and cfg.schedule.w_reserve != "0") else ""
            warnings.append(
                f"pp rank {r} needs {stage.memory_total / GIB:.1f} GiB > cluster.gpu_memory_gb="
                f"{cfg.cluster.gpu_memory_gb:g}; raise layout.pp, use a vocab method or V-Half{lean}"
            )
        out.append(stage)
    peak = device.peak_flops[cfg.precision]
    mfu = m * model_flops(shape) / (sim.makespan * p * peak) if sim.makespan > 0 else 0.0
    return Plan(resolved, sim, out, mfu, warnings)


def _chunk_peak(s: Schedule, rank: int, chunk: int) -> int:
    held = best = 0
    for a in s.ranks[rank]:
        if a.chunk == chunk and a.kind is PassKind.F:
            held += 1
            best = max(best, held)
        elif a.chunk == chunk and a.kind is PassKind.B:
            held -= 1
    return best


def run_plan(cfg: RunConfig, flags: list[str] | None = None) -> int:
    """The `vptrain plan` command: print the plan, write plan.json / schedule.{txt,png}. Returns 0."""
    if flags and "--search" in flags:  # rank methods x layouts instead (vptrain/search.py)
        from vptrain.search import run_search

        return run_search(cfg)
    started = time.perf_counter()
    plan = make_plan(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "schedule.txt"), "w") as f:
        f.write(plan.resolved.schedule_text())
    with open(os.path.join(cfg.run_dir, "plan.json"), "w") as f:
        json.dump(plan_dict(plan), f, indent=1)
    render_png(plan.schedule, plan.sim, os.path.join(cfg.run_dir, "schedule.png"))
    print(format_report(plan))
    elapsed = time.perf_counter() - started
    print(f"(planned in {elapsed:.1f} s; wrote plan.json, schedule.txt, schedule.png to {cfg.run_dir})")
    print(summary_line(plan))
    return 0


def plan_dict(plan: Plan) -> dict:
    sim = plan.sim
    return {
        "config": _config_summary(plan),
        "resolved": plan.resolved.summary(),
        "rank_map": [{"rank": c.rank, "pp": c.pp, "dp": c.dp} for c in plan.resolved.layout.rank_map],
        "stages": [
            {
                "pp_rank": st.layout.pp_rank,
                "stages": list(st.layout.stages),
                "layers": list(st.layout.layers),
                "vocab_rows": {"embedding": list(st.layout.embedding_rows), "output": list(st.layout.output_rows)},
                "parameters": st.parameters,
                "memory_bytes": {**{k: st.memory[k] for k in MEMORY_KINDS}, "total": st.memory_total},
                "compute_flops": st.flops,
                "busy_seconds": st.busy_s,
                "peak_in_flight": st.peak_in_flight,
            }
            for st in plan.stages
        ],
        "schedule": {
            "method": plan.schedule.method,
            "name": plan.schedule.name,
            "p": plan.schedule.p,
            "m": plan.schedule.num_microbatches,
            "actions": sum(len(row) for row in plan.schedule.ranks),
            "bubble_rate": sim.bubble_rate,
            "peak_in_flight": list(sim.peak_in_flight),
            "peak_vocab_in_flight": list(sim.peak_vocab_in_flight),
            "predicted_iteration_seconds": sim.makespan,
            "mfu": plan.mfu,
            "busy_seconds": list(sim.busy),
        },
        "warnings": plan.warnings,
    }


def _config_summary(plan: Plan) -> dict:
    cfg, lay = plan.cfg, plan.resolved.layout
    m = cfg.model
    return {
        "model": m.name, "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads, "seq": m.seq_len,
        "vocab": m.vocab_size, "vocab_rows": lay.vocab.rows, "method": cfg.method.name,
        "schedule": cfg.schedule.name, "pp": cfg.layout.pp, "dp": cfg.layout.dp, "microbatches": lay.num_microbatches,
        "micro_batch_size": cfg.train.micro_batch_size, "precision": cfg.precision,
        "chunk_tokens": lay.chunk_tokens, "chunk_tokens_chosen": cfg.vocab.chunk_tokens is None,
        "profile": cfg.cluster.profile, "gpu_memory_gb": cfg.cluster.gpu_memory_gb,
    }


def _chunks(c: dict) -> str:
    chunk = c["chunk_tokens"]
    what = "all tokens of a microbatch at once" if chunk == 0 else f"chunks of {chunk} tokens"
    return f"{what} (vocab.chunk_tokens={'unset: chosen from gpu_memory_gb' if c['chunk_tokens_chosen'] else chunk})"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_report(plan: Plan) -> str:
    cfg, sim = plan.cfg, plan.sim
    c = _config_summary(plan)
    lines = [
        f"vptrain plan: {c['model']} ({c['layers']} layers, h {c['hidden']}, {c['heads']} heads, s {c['seq']}, "
        f"V {c['vocab']} -> {c['vocab_rows']} rows), method {c['method']}, schedule {c['schedule']}",
        f"  pp {c['pp']} x dp {c['dp']} = {c['pp'] * c['dp']} ranks, {c['microbatches']} microbatches of "
        f"{c['micro_batch_size']} per pipeline, {c['precision']}, profile {c['profile']} "
        f"({c['gpu_memory_gb']:g} GB per device)",
        f"  output layer: {_chunks(c)}",
        "",
        "rank map (rank = dp_index * pp + pp_index: the pipeline index varies fastest)",
    ]
    coords = plan.resolved.layout.rank_map
    for d in range(min(cfg.layout.dp, 4)):
        ranks = [x.rank for x in coords if x.dp == d]
        lines.append(f"  dp {d}: ranks {ranks[0]}..{ranks[-1]} = pp 0..{cfg.layout.pp - 1}")
    if cfg.layout.dp > 4:
        lines.append(f"  ... {cfg.layout.dp - 4} more data-parallel replicas")
    lines += ["", _stage_table(plan), ""]
    lines.append("schedule (time view; columns are start times, ... elides the middle):")
    lines.append(render_ascii(plan.schedule, sim=sim, max_columns=36))
    lines.append("")
    peak = device_profile(cfg.cluster.profile).peak_flops[cfg.precision]
    lines.append(
        f"simulated: bubble {sim.bubble_rate:.1%}, iteration {sim.makespan:.3g} s, "
        f"MFU {plan.mfu:.1%} of {peak / 1e12:g} TFLOP/s ({cfg.precision}, {cfg.cluster.profile})"
    )
    busy = [st.busy_s for st in plan.stages]
    lines.append(f"stage compute: max/min {max(busy) / max(min(busy), 1e-30):.2f}, peak in-flight "
                 f"microbatch-chunks per rank {list(sim.peak_in_flight)}")
    lines.append(f"schedule.txt sha1 {plan.resolved.summary()['schedule_sha1'][:12]}: the trainer runs these "
                 "actions (W&B config plan.schedule_sha1)")
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


MEMORY_UNITS = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))


def memory_unit(largest_bytes: float) -> tuple[str, float]:
    """The largest unit in which `largest_bytes` reads at least 1 (a tiny model's table in KiB, not
    a column of 0.00 GiB)."""
    return next(((name, size) for name, size in MEMORY_UNITS if largest_bytes >= size), MEMORY_UNITS[-1])


def _stage_table(plan: Plan) -> str:
    unit, size = memory_unit(max(st.memory_total for st in plan.stages))
    head = ("rank", "layers", "emb rows", "out rows", "params", "param", "grad", "optim", "act", "vocab",
            f"total {unit}", "FLOP/step", "busy s", "in-flight")
    rows = []
    for st in plan.stages:
        lay, mem = st.layout, st.memory
        rows.append((
            str(lay.pp_rank), "+".join(str(n) for n in lay.layers), _rows(lay.embedding_rows), _rows(lay.output_rows),
            _si(st.parameters), *(f"{mem[k] / size:.2f}" for k in MEMORY_KINDS), f"{st.memory_total / size:.2f}",
            _si(st.flops), f"{st.busy_s:.3g}", str(st.peak_in_flight),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [f"per stage (memory in {unit}: parameters, gradients, optimizer state, activations, vocab buffers)"]
    out.append(fmt.format(*head))
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def _rows(span: tuple[int, int]) -> str:
    return "-" if span[0] == span[1] else f"{span[0]}:{span[1]}"


def summary_line(plan: Plan) -> str:
    """One greppable line per job, so a multirun over methods compares at a glance."""
    c = _config_summary(plan)
    busy = [st.busy_s for st in plan.stages]
    mem = max(st.memory_total for st in plan.stages)
    return (
        f"PLAN method={c['method']} schedule={c['schedule']} pp={c['pp']} dp={c['dp']} m={c['microbatches']} "
        f"V={c['vocab']} bubble={plan.sim.bubble_rate:.1%} iter_s={plan.sim.makespan:.4g} mfu={plan.mfu:.1%} "
        f"max_mem_gib={mem / GIB:.1f} busy_max/min={max(busy) / max(min(busy), 1e-30):.2f}"
    )


def compare_table(paths: list[str]) -> str:
    """A table over plan.json files (or directories searched recursively for them)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                files += [os.path.join(root, n) for n in names if n == "plan.json"]
        else:
            files.append(path)
    head = ("method", "schedule", "pp", "m", "vocab", "bubble", "iter s", "MFU", "max GiB", "busy max/min", "path")
    rows = []
    for path in sorted(files):
        with open(path) as f:
            d = json.load(f)
        busy = d["schedule"]["busy_seconds"]
        rows.append((
            d["config"]["method"], d["config"]["schedule"], str(d["config"]["pp"]), str(d["config"]["microbatches"]),
            str(d["config"]["vocab"]), f"{d['schedule']['bubble_rate']:.1%}",
            f"{d['schedule']['predicted_iteration_seconds']:.4g}", f"{d['schedule']['mfu']:.1%}",
            f"{max(s['memory_bytes']['total'] for s in d['stages']) / GIB:.1f}",
            f"{max(busy) / max(min(busy), 1e-30):.2f}", os.path.dirname(path),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])
