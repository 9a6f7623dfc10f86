"""A checkpoint of any layout seen as the single-process model: every parameter and its optimizer
state under its global name (vptrain/engine/param_names.py), whatever pp, dp, method, schedule,
precision or ZeRO stage wrote it.

Each rank file lists its parameters as (local name, global name, rows) in the optimizer's order
(`param_slices`) and says which stage and data-parallel replica wrote it (`coord`). Values come
from one of three formats:
  - torch     (fp32, optim.zero_stage=0; also the single-process trainer): the module's tensors
              and a torch optimizer state dict whose i-th entry belongs to the i-th parameter;
  - deepspeed (precision=bf16: BF16_Optimizer; optim.zero_stage=1: ZeRO): per stage, one flat fp32
              master vector (the parameters concatenated in optimizer order, padded at the end),
              cut into equal partitions over the stage's data-parallel ranks, with exp_avg /
              exp_avg_sq as vectors of the same partitions.

Values are always fp32 and the ones the optimizer steps on: the fp32 master weights where the
optimizer keeps them (bf16, ZeRO), otherwise the module's (fp32) parameters. A vocabulary table is
returned padded to the writer's `vocab_rows` (meta.json); rows >= model.vocab_size are padding.

Rank files are opened with mmap, and a view assembles only the rows it is asked for, so a rank
resharding a large checkpoint reads its own slices, not every table in full.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from vptrain.checkpoint import CheckpointError, load_rank_file, read_meta
from vptrain.engine.param_names import GlobalSlice

ADAM_KINDS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    """What one stage holds of a global parameter: all of it (rows None) or rows [start, end)."""

    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    values: dict[str, torch.Tensor]  # kind ("param", "exp_avg", ...) -> tensor of `shape`
    step: float | None  # the optimizer's step count for this parameter (None: no state, e.g. SGD)


@dataclass
class CheckpointView:
    """The global parameters of checkpoint directory `path` and their optimizer state."""

    path: str
    meta: dict
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    scheduler: dict | None = None
    rank0: dict | None = None  # rank 0's state (RNG, engine counters)

    def names(self) -> list[str]:
        return list(self.pieces)

    def kinds(self, name: str) -> list[str]:
        """Optimizer state kinds held for `name` (empty for SGD without momentum)."""
        return [k for k in self.pieces[name][0].values if k != "param"]

    def step(self, name: str) -> float | None:
        return self.pieces[name][0].step

    def tensor(self, name: str, kind: str = "param", rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Global parameter `name` (or its optimizer state `kind`), fp32; `rows` [start, end) of a
        vocabulary table, where rows past the writer's padded table are zero padding."""
        if name not in self.pieces:
            raise CheckpointError(f"{self.path}: no parameter {name} in the checkpoint")
        pieces = self.pieces[name]
        if pieces[0].rows is None:
            value = pieces[0].values[kind]
            return value if rows is None else value[rows[0]:rows[1]]
        total = max(p.rows[1] for p in pieces)
        start, end = rows if rows is not None else (0, total)
        parts, at = [], start
        for piece in sorted(pieces, key=lambda p: p.rows[0]):
            lo, hi = max(at, piece.rows[0]), min(end, piece.rows[1])
            if lo < hi:
                parts.append(piece.values[kind][lo - piece.rows[0]:hi - piece.rows[0]])
                at = hi
        if at < end:  # rows past the writer's table: padding (zero weights, zero state)
            parts.append(torch.zeros((end - at, *pieces[0].shape[1:]), dtype=torch.float32))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def open_checkpoint(path: str) -> CheckpointView:
    """Read every rank file of checkpoint directory `path` (lazily: mmap) into a CheckpointView."""
    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(f"{os.path.join(path, 'meta.json')} is missing or not valid JSON")
    world = meta.get("world_size")
    if not isinstance(world, int):
        raise CheckpointError(f"{path}/meta.json records no world_size: not a vptrain checkpoint")
    deepspeed_state = int(meta.get("pp", 1)) > 1
    stages: dict[int, dict[int, dict]] = {}
    for rank in range(world):
        state = load_rank_file(os.path.join(path, f"rank_{rank}.pt"), deepspeed_state=deepspeed_state, mmap=True)
        if "param_slices" not in state or "coord" not in state:
            raise CheckpointError(
                f"{path}/rank_{rank}.pt records no param_slices: it was written before checkpoints said which "
                "part of the model each rank holds, so it can only resume in the layout that wrote it")
        coord = state["coord"]
        stages.setdefault(int(coord["stage"]), {})[int(coord["dp_rank"])] = state
    view = CheckpointView(path=path, meta=meta)
    for stage in sorted(stages):
        replicas = stages[stage]
        for name, piece in _stage_pieces(path, stage, [replicas[d] for d in sorted(replicas)]):
            view.pieces.setdefault(name, []).append(piece)
    _check_coverage(view)
    first = stages[min(stages)][0]
    view.scheduler, view.rank0 = first.get("scheduler"), first
    return view


def global_params(path: str) -> dict[str, torch.Tensor]:
    """Every parameter of the single-process model as one fp32 tensor (vocabulary tables padded to
    the writer's vocab_rows), from data-parallel replica 0 or the fp32 master partitions."""
    view = open_checkpoint(path)
    return {name: view.tensor(name).clone() for name in view.names()}


@dataclass(frozen=True)
class GlobalOptimizerState:
    name: str  # optim.name of the writer: adamw | sgd
    per_param: dict[str, dict[str, torch.Tensor | float]]  # global name -> {exp_avg, exp_avg_sq, step} (AdamW)
    scheduler: dict | None  # the LambdaLR state dict (layout-independent)


def global_optimizer_state(path: str) -> GlobalOptimizerState:
    """Per global parameter its optimizer state as full fp32 tensors: AdamW's exp_avg, exp_avg_sq
    and step; SGD without momentum has none (an empty dict), with momentum `momentum_buffer`."""
    view = open_checkpoint(path)
    per_param: dict[str, dict] = {}
    for name in view.names():
        entry: dict = {kind: view.tensor(name, kind).clone() for kind in view.kinds(name)}
        if view.step(name) is not None:
            entry["step"] = view.step(name)
        per_param[name] = entry
    return GlobalOptimizerState(name=(view.meta.get("optim") or {}).get("name", "unknown"), per_param=per_param,
                                scheduler=view.scheduler)


# --- decoding one stage's rank files ----------------------------------------------------------------


def _stage_pieces(path: str, stage: int, replicas: list[dict]):
    """(global name, Piece) for every parameter of `stage`, from its data-parallel replicas' files."""
    first = replicas[0]
    slices = [(local, GlobalSlice.from_list([name, rows])) for local, name, rows in first["param_slices"]]
    module = first["model"] if "model" in first else first["module"]
    shapes = [tuple(module[local].shape) for local, _ in slices]
    optimizer = first["optimizer"]
    if "base_optimizer_state" in optimizer:
        values, steps = _deepspeed_values(path, stage, replicas, slices, shapes)
    else:
        values, steps = _torch_values(module, optimizer, slices)
    for i, (_, where) in enumerate(slices):
        yield where.name, Piece(rows=where.rows, shape=shapes[i], values=values[i], step=steps[i])


def _torch_values(module: dict, optimizer: dict, slices: list) -> tuple[list[dict], list]:
    """A torch optimizer state dict: state[i] belongs to the i-th parameter of its single group."""
    groups = optimizer["param_groups"]
    order = [i for g in groups for i in g["params"]]
    values, steps = [], []
    for i, (local, _) in enumerate(slices):
        entry = {"param": module[local].detach().float()}
        state = optimizer["state"].get(order[i], {})
        entry.update({k: v.detach().float() for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"
                      and v.dim() > 0})
        steps.append(float(state["step"]) if "step" in state else None)
        values.append(entry)
    return values, steps


def _deepspeed_values(path: str, stage: int, replicas: list[dict], slices: list, shapes: list) -> tuple[list, list]:
    """BF16_Optimizer / ZeRO: the stage's fp32 master weights and optimizer state are flat vectors
    cut into one partition per data-parallel rank; `param_slice_mappings` says where in its
    partition each rank holds a fragment of a parameter (numel, start). A parameter is its
    fragments in partition order, whatever padding DeepSpeed put between parameters."""
    states = [r["optimizer"] for r in replicas]
    if any(len(s["single_partition_of_fp32_groups"]) != 1 for s in states):
        raise CheckpointError(f"{path}: stage {stage} has more than one optimizer parameter group; vptrain writes one")
    count = int(states[0]["partition_count"][0])
    if count != len(replicas):
        raise CheckpointError(f"{path}: stage {stage} has {len(replicas)} data-parallel rank files but its optimizer "
                              f"state is cut into {count} partitions")
    inner = [s["base_optimizer_state"]["state"].get(0, {}) for s in states]
    flats = {"param": [s["single_partition_of_fp32_groups"][0] for s in states]}
    for kind, value in inner[0].items():
        if kind != "step" and isinstance(value, torch.Tensor) and value.dim() > 0:
            flats[kind] = [st[kind] for st in inner]
    step = inner[0].get("step")
    mappings = [s["param_slice_mappings"][0] for s in states]
    values = []
    for (local, _), shape in zip(slices, shapes, strict=True):
        fragments = [(d, m[local]) for d, m in enumerate(mappings) if local in m]
        if sum(f.numel for _, f in fragments) != _numel(shape):
            raise CheckpointError(f"{path}: stage {stage}: the optimizer's fragments of {local} hold "
                                  f"{sum(f.numel for _, f in fragments)} of its {_numel(shape)} elements")
        entry = {}
        for kind, parts in flats.items():
            pieces = [parts[d].detach()[f.start:f.start + f.numel] for d, f in fragments]
            entry[kind] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).float().view(shape)
        values.append(entry)
    return values, [None if step is None else float(step)] * len(slices)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_coverage(view: CheckpointView) -> None:
    """Every table's row pieces tile [0, rows) without gaps or overlaps."""
    for name, pieces in view.pieces.items():
        if pieces[0].rows is None:
            if len(pieces) != 1:
                raise CheckpointError(f"{view.path}: {name} is held by {len(pieces)} stages")
            continue
        at = 0
        for piece in sorted(pieces, key=lambda p: p.rows[0]):
            if piece.rows[0] != at:
                raise CheckpointError(f"{view.path}: rows of {name} do not tile the table (a gap or overlap at "
                                      f"row {at})")
            at = piece.rows[1]
        expected = view.meta.get("vocab_rows")
        if isinstance(expected, int) and at != expected:
            raise CheckpointError(f"{view.path}: {name} has {at} rows; meta.json records vocab_rows={expected}")
