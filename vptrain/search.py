"""`vptrain plan --search`: which vocabulary remedy, schedule and (pp, dp) to run on N GPUs.

    vptrain plan --search model=gpt-4b model.vocab_size=131072 cluster=a100 precision=bf16 \\
        search.gpus=8 search.memory_gib=80 train.global_batch_size=128

Candidates: every method x schedule it runs on (V-Half: baseline and the overlapped vocabulary
methods) x (pp, dp) with pp * dp = search.gpus, pp at most the layers per chunk allow and m = B /
(micro * dp) at least pp, x for redis every final-stage layer count k < L/pp (the other stages split
the rest, the later ones taking the remainder, as the VP artifact does). Each is estimated from the
cost model (search_estimate.py, milliseconds); the candidates that fit the memory budget are
simulated (make_plan, the plan `vptrain plan` prints) in order of their estimate, each estimate
scaled by what the simulation showed for the same method and schedule at another (pp, dp), until
the top search.top are known and the next is more than search.margin behind, and the best of each
method that did not make the top is simulated too, to say why it loses. Each make_plan is its own
config's plan, so the winner's numbers are exactly what `vptrain plan` prints for it (plus the
data-parallel gradient sync, which the pipeline simulation does not model:
search_estimate.dp_sync_seconds); only the validated schedules are shared across candidates
(schedule/memo.py: a schedule is a function of method, schedule, p, m and the quantised nominal
costs), and the cyclic garbage collector is paused while a plan is made (schedule/nogc.py).

Writes search.json (the simulated candidates that fit, sorted by predicted_iteration_seconds) and
search_candidates.json (every candidate with its estimate and what became of it).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

from vptrain.config import METHODS, SCHEDULES, RunConfig, microbatches
from vptrain.layout import even_split
from vptrain.schedule.memo import ScheduleMemo
from vptrain.schedule.nogc import paused_gc
from vptrain.search_estimate import Estimate, dp_sync_seconds, estimate
from vptrain.validate import SCHEDULE_METHODS, validate

GIB = float(1 << 30)


@dataclass(frozen=True)
class Candidate:
    method: str
    schedule: str
    pp: int
    dp: int
    layers_per_stage: tuple[int, ...] | None = None

    def overrides(self) -> list[str]:
        out = [f"method={self.method}", f"schedule={self.schedule}", f"layout.pp={self.pp}", f"layout.dp={self.dp}"]
        if self.layers_per_stage is not None:
            out.append("layout.layers_per_stage=[" + ",".join(map(str, self.layers_per_stage)) + "]")
        return out

    def config(self, base: RunConfig) -> RunConfig:
        cfg = copy.deepcopy(base)
        cfg.method.name, cfg.schedule.name = self.method, self.schedule
        cfg.layout.pp, cfg.layout.dp = self.pp, self.dp
        cfg.layout.layers_per_stage = list(self.layers_per_stage) if self.layers_per_stage is not None else None
        return cfg


@dataclass
class Outcome:
    candidate: Candidate
    estimate: Estimate | None = None
    status: str = "estimated"
    """invalid | out_of_memory | estimated | simulated"""
    reason: str = ""
    result: dict = field(default_factory=dict)
    """Simulated: the search.json entry."""
    sync: float = 0.0
    """Estimated data-parallel gradient sync per step (search_estimate.dp_sync_seconds)."""

    @property
    def seconds(self) -> float:
        if self.result:
            return self.result["predicted_iteration_seconds"]
        return self.estimate.pipeline_seconds + self.sync if self.estimate else float("inf")


def check_search(cfg: RunConfig) -> tuple[int, float]:
    """(GPUs, budget bytes) of the search; ValueError naming the search.* key otherwise."""
    s = cfg.search
    gpus = cfg.layout.pp * cfg.layout.dp if s.gpus is None else s.gpus
    memory = cfg.cluster.gpu_memory_gb if s.memory_gib is None else s.memory_gib
    if gpus < 1:
        raise ValueError(f"search.gpus: must be >= 1, got {gpus}")
    if memory <= 0:
        raise ValueError(f"search.memory_gib: must be > 0 GiB, got {memory:g}")
    if s.top < 1:
        raise ValueError(f"search.top: must be >= 1, got {s.top}")
    if s.margin < 0:
        raise ValueError(f"search.margin: must be >= 0, got {s.margin:g}")
    if s.max_simulations < s.top:
        raise ValueError(f"search.max_simulations: {s.max_simulations} < search.top={s.top}; raise it")
    for key, values, known in (("search.methods", s.methods, METHODS), ("search.schedules", s.schedules, SCHEDULES)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise ValueError(f"{key}: {bad or 'empty'}; choose from {', '.join(known)}")
    if not layouts(cfg, gpus):
        b, mb, layers = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.num_layers
        raise ValueError(
            f"search.gpus: no pp x dp = {gpus} fits: pp must be at most model.num_layers={layers}, dp must divide "
            f"train.global_batch_size / train.micro_batch_size = {b // mb} and leave at least pp microbatches; "
            f"choose search.gpus among {', '.join(map(str, sorted(_feasible_gpu_counts(cfg))))}"
        )
    return gpus, memory * GIB


def layouts(cfg: RunConfig, gpus: int) -> list[tuple[int, int]]:
    """(pp, dp) with pp * dp = gpus, pp <= layers, dp dividing the batch, m >= pp."""
    b, mb, layers = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.num_layers
    out = []
    for pp in range(1, min(gpus, layers) + 1):
        dp = gpus // pp
        if pp * dp == gpus and b % (mb * dp) == 0 and b // (mb * dp) >= pp:
            out.append((pp, dp))
    return out


def _feasible_gpu_counts(cfg: RunConfig) -> set[int]:
    return {n for n in range(1, 257) if layouts(cfg, n)}


def candidates(cfg: RunConfig, gpus: int) -> list[Candidate]:
    layers = cfg.model.num_layers
    out = []
    for pp, dp in layouts(cfg, gpus):
        for method in cfg.search.methods:
            for schedule in cfg.search.schedules:
                if method not in SCHEDULE_METHODS[schedule] or (pp == 1 and (method, schedule) != ("baseline", "1f1b")):
                    continue
                if method != "redis":
                    out.append(Candidate(method, schedule, pp, dp))
                    continue
                for k in range(0, layers // pp) if pp > 1 else ():
                    if layers - k >= pp - 1:  # every other stage keeps a layer
                        out.append(Candidate(method, schedule, pp, dp, (*even_split(layers - k, pp - 1), k)))
    return out


def simulate_entry(cfg: RunConfig, cand: Candidate, est: Estimate, memo: ScheduleMemo | None = None) -> dict:
    """The search.json entry of one candidate: its make_plan prediction plus the dp gradient sync.
    `memo`: the search's schedules so far (schedule/memo.py; the plan is the same without it)."""
    from vptrain.plan import make_plan

    with paused_gc():  # build + validate + simulate allocate much and leave no cycles (schedule/nogc.py)
        plan = make_plan(cand.config(cfg), memo=memo)
    sync = dp_sync_seconds(plan.cfg, est.grad_bytes)
    iteration = plan.iteration_s + sync
    busy = list(plan.sim.busy)
    return {
        "method": cand.method, "schedule": cand.schedule, "pp": cand.pp, "dp": cand.dp,
        "microbatches": microbatches(plan.cfg),
        "layers_per_stage": list(cand.layers_per_stage) if cand.layers_per_stage else None,
        "predicted_iteration_seconds": iteration,
        "mfu": plan.mfu * plan.iteration_s / iteration if iteration > 0 else 0.0,
        "bubble": plan.sim.bubble_rate,
        "peak_memory_bytes": max(st.memory_total for st in plan.stages),
        "pipeline_seconds": plan.iteration_s, "dp_sync_seconds": sync,
        "busy_max_over_mean": max(busy) * len(busy) / sum(busy) if sum(busy) > 0 else 1.0,
        "estimated_seconds": est.pipeline_seconds, "overrides": cand.overrides(),
    }


def search(cfg: RunConfig) -> tuple[list[Outcome], dict[str, str]]:
    """Every candidate's outcome (simulated first, by predicted time) and, per method missing from
    the top, one line saying why it loses."""
    gpus, budget = check_search(cfg)
    s = cfg.search
    outcomes = []
    for cand in candidates(cfg, gpus):
        out = Outcome(cand)
        try:
            c = cand.config(cfg)
            validate(c)
            out.estimate = estimate(c)
            out.sync = dp_sync_seconds(c, out.estimate.grad_bytes)
        except ValueError as err:
            out.status, out.reason = "invalid", str(err)
        else:
            if out.estimate.peak_memory_bytes > budget:
                out.status = "out_of_memory"
                out.reason = f"needs about {out.estimate.peak_memory_bytes / GIB:.1f} GiB (estimated)"
        outcomes.append(out)
    pending = [o for o in outcomes if o.status == "estimated"]
    fits: list[Outcome] = []
    simulated = 0
    # simulated / estimated pipeline time of the last simulated candidate of each (method, schedule):
    # the estimate omits each schedule's own stalls, which are much the same at every (pp, dp).
    learned: dict[tuple[str, str], float] = {}
    memo = ScheduleMemo()  # this search's schedules: redis's layer splits often share one

    def guess(o: Outcome) -> float:
        ratio = learned.get((o.candidate.method, o.candidate.schedule), 1.0)
        return o.estimate.pipeline_seconds * ratio + o.sync

    def run(o: Outcome) -> None:
        nonlocal simulated
        simulated += 1
        pending.remove(o)
        o.result, o.status = simulate_entry(cfg, o.candidate, o.estimate, memo), "simulated"
        learned[(o.candidate.method, o.candidate.schedule)] = o.result["pipeline_seconds"] / o.estimate.pipeline_seconds
        if o.result["peak_memory_bytes"] > budget:
            o.status, o.reason = "out_of_memory", f"needs {o.result['peak_memory_bytes'] / GIB:.1f} GiB (simulated)"
            o.result = {}
        else:
            fits.append(o)
            fits.sort(key=lambda x: x.seconds)

    while pending and simulated < s.max_simulations:
        nxt = min(pending, key=guess)
        if len(fits) >= s.top and guess(nxt) > fits[s.top - 1].seconds * (1 + s.margin):
            break
        run(nxt)
    top_methods = {o.candidate.method for o in fits[: s.top]}
    for method in dict.fromkeys(o.candidate.method for o in outcomes):
        if method in top_methods or any(f.candidate.method == method for f in fits):
            continue
        # Its best by estimate; then, with the estimates rescaled by that simulation, any of its
        # candidates that now promises better (at most 3 simulations per method).
        for _ in range(3):
            mine = [o for o in pending if o.candidate.method == method]
            done = [f.seconds for f in fits if f.candidate.method == method]
            if not mine or (done and guess(min(mine, key=guess)) >= min(done)):
                break
            run(min(mine, key=guess))
    reasons = {m: why_it_loses(m, outcomes, fits, budget) for m in dict.fromkeys(o.candidate.method for o in outcomes)
               if m not in top_methods}
    order = {"simulated": 0, "estimated": 1, "out_of_memory": 2, "invalid": 3}
    outcomes.sort(key=lambda o: (order[o.status], o.seconds))
    return outcomes, reasons


def why_it_loses(method: str, outcomes: list[Outcome], fits: list[Outcome], budget: float) -> str:
    mine = [o for o in outcomes if o.candidate.method == method]
    ok = [o for o in fits if o.candidate.method == method]
    if not ok:
        est = [o for o in mine if o.status == "estimated"]
        if est:
            best = min(est, key=lambda o: o.seconds)
            return (f"not simulated: its best estimate ({describe(best.candidate)}) is "
                    f"{best.seconds / fits[0].seconds - 1:+.0%} behind the winner" if fits else "not simulated")
        sized = [o for o in mine if o.status == "out_of_memory"]
        if sized:
            best = min(sized, key=lambda o: o.estimate.peak_memory_bytes if o.estimate else float("inf"))
            return f"out of memory: even {describe(best.candidate)} {best.reason} > {budget / GIB:g} GiB"
        return f"no valid layout ({mine[0].reason if mine else 'not searched'})"
    best, win = ok[0].result, fits[0].result
    gap = best["predicted_iteration_seconds"] / win["predicted_iteration_seconds"] - 1
    head = f"best {describe(ok[0].candidate)} {best['predicted_iteration_seconds']:.3g} s ({gap:+.1%})"
    if best["busy_max_over_mean"] > win["busy_max_over_mean"] + 0.05:
        return (f"imbalance: {head}; its busiest stage computes {best['busy_max_over_mean']:.2f}x the mean "
                f"(winner {win['busy_max_over_mean']:.2f}x)")
    if best["bubble"] > win["bubble"] + 0.01:
        return f"bubble: {head}; {best['bubble']:.1%} idle against the winner's {win['bubble']:.1%}"
    if best["dp_sync_seconds"] > win["dp_sync_seconds"] * 1.5 + 1e-3:
        return f"gradient sync: {head}; {best['dp_sync_seconds']:.3g} s of dp all-reduce per step"
    return f"compute: {head}; the same balance, more work per step (its extra passes or a layout memory forces)"


def describe(c: Candidate) -> str:
    split = f" layers {'+'.join(map(str, c.layers_per_stage))}" if c.layers_per_stage else ""
    return f"{c.schedule} pp={c.pp} dp={c.dp}{split}"


def run_search(cfg: RunConfig) -> int:
    """The `vptrain plan --search` command: print the top plans and the losers' reasons, write
    search.json and search_candidates.json into the run directory. Returns 0."""
    started = time.perf_counter()
    gpus, budget = check_search(cfg)
    outcomes, reasons = search(cfg)
    entries = [o.result for o in outcomes if o.status == "simulated"]
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "search.json"), "w") as f:
        json.dump(entries, f, indent=1)
    with open(os.path.join(cfg.run_dir, "search_candidates.json"), "w") as f:
        json.dump([candidate_record(o) for o in outcomes], f, indent=1)
    print(format_search(cfg, gpus, budget, outcomes, reasons, entries))
    print(f"(searched in {time.perf_counter() - started:.1f} s; wrote search.json, search_candidates.json "
          f"to {cfg.run_dir})")
    return 0


def candidate_record(o: Outcome) -> dict:
    rec = {"method": o.candidate.method, "schedule": o.candidate.schedule, "pp": o.candidate.pp, "dp": o.candidate.dp,
           "layers_per_stage": list(o.candidate.layers_per_stage) if o.candidate.layers_per_stage else None,
           "status": o.status, "reason": o.reason}
    if o.estimate:
        rec |= {"estimated_seconds": o.estimate.pipeline_seconds,
                "estimated_peak_memory_bytes": o.estimate.peak_memory_bytes,
                "busy_max_over_mean": o.estimate.imbalance}
    return rec | ({"predicted_iteration_seconds": o.result["predicted_iteration_seconds"]} if o.result else {})


def format_search(cfg: RunConfig, gpus: int, budget: float, outcomes: list[Outcome], reasons: dict[str, str],
                  entries: list[dict]) -> str:
    m = cfg.model
    count = {k: sum(o.status == k for o in outcomes) for k in ("simulated", "estimated", "out_of_memory", "invalid")}
    lines = [
        f"vptrain plan --search: {m.name} ({m.num_layers} layers, h {m.hidden_size}, s {m.seq_len}, V {m.vocab_size}), "
        f"{gpus} GPUs x {budget / GIB:g} GiB, global batch {cfg.train.global_batch_size} of "
        f"{cfg.train.micro_batch_size}, {cfg.cluster.profile} {cfg.precision}",
        f"  {len(outcomes)} candidates: {count['simulated']} simulated and fit, {count['estimated']} ranked by "
        f"estimate only, {count['out_of_memory']} out of memory, {count['invalid']} invalid",
        "",
    ]
    head = ("#", "method", "schedule", "pp x dp", "layers", "iter s", "MFU", "bubble", "peak GiB", "busy max/mean")
    rows = [(str(i + 1), e["method"], e["schedule"], f"{e['pp']} x {e['dp']}",
             "+".join(map(str, e["layers_per_stage"])) if e["layers_per_stage"] else "even",
             f"{e['predicted_iteration_seconds']:.3f}", f"{e['mfu']:.1%}", f"{e['bubble']:.1%}",
             f"{e['peak_memory_bytes'] / GIB:.1f}", f"{e['busy_max_over_mean']:.2f}")
            for i, e in enumerate(entries[: cfg.search.top])]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    if not entries:
        lines.append("  nothing fits: raise search.memory_gib or search.gpus, or use optim.zero_stage=1")
    if reasons:
        lines += ["", "why the other methods lose:"] + [f"  {k}: {v}" for k, v in reasons.items()]
    if entries:
        user = [o for o in cfg.overrides if not o.startswith(("search.", "method=", "schedule=", "layout."))]
        lines += ["", "best: vptrain plan " + " ".join(user + entries[0]["overrides"])]
    return "\n".join(lines)
