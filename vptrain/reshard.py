"""Load a checkpoint written by another layout into the freshly built trainer of this one.

The checkpoint is read as the single-process model (vptrain/checkpoint_global.py); each rank takes
the slices its own parameters are (`trainer.global_slices()`: a transformer parameter whole, rows
[start, end) of a vocabulary table), copies them into its module and builds its optimizer's state
from the same slices of exp_avg / exp_avg_sq, at the writer's step count. Rows past the writer's
padded table (this layout pads to another multiple) are zero, as padding rows always are.

No collective runs here: every rank reads the files it needs (mmap), so ranks may finish in any
order. Target optimizer formats:
  - torch (fp32, optim.zero_stage=0, and the single-process trainer): a state dict in the
    optimizer's parameter order, loaded with load_state_dict;
  - DeepSpeed's BF16_Optimizer and ZeRO-1/2: every parameter's `_hp_mapping` names the fragment of
    this rank's fp32 master partition it owns; the master, the optimizer state of the partition
    and the (bf16) module parameter are written from the fp32 values.
"""

from __future__ import annotations

import torch

from vptrain.checkpoint import CheckpointError
from vptrain.checkpoint_global import CheckpointView, open_checkpoint
from vptrain.config import RunConfig
from vptrain.engine.param_names import GlobalSlice


def layout_differences(cfg: RunConfig, meta: dict, *, world_size: int) -> list[str]:
    """What differs between the layout that wrote checkpoint `meta` and this run's, as `key=saved
    (this run: value)`; keys an older meta.json does not record count as equal."""
    from vptrain.resolved import vocab_shards

    ours = {"world_size": world_size, "pp": cfg.layout.pp, "dp": cfg.layout.dp, "method": cfg.method.name,
            "schedule": cfg.schedule.name, "precision": cfg.precision, "vocab_rows": vocab_shards(cfg).rows,
            "zero_stage": cfg.optim.zero_stage}
    saved = {**meta, "zero_stage": (meta.get("optim") or {}).get("zero_stage")}
    return [f"{k}={saved[k]} (this run: {v})" for k, v in ours.items() if saved.get(k) is not None and saved[k] != v]


def can_reshard(meta: dict) -> bool:
    """meta.json records what wrote the checkpoint (checkpoint.written_by): rank files then list
    their param_slices, which resharding reads."""
    return isinstance(meta.get("model"), dict) and isinstance(meta.get("vocab_rows"), int)


def holds_what_trainer_holds(state: dict, trainer) -> bool:
    """The rank file lists the same parameters, in the same order, as this rank's trainer (older
    files, without the list, are taken to match: their layout was compared above)."""
    if "param_slices" not in state:
        return True
    ours = [[local, *s.to_list()] for local, s in trainer.global_slices().items()]
    return [list(item) for item in state["param_slices"]] == ours


def module_of(trainer) -> torch.nn.Module:
    return trainer.model if hasattr(trainer, "model") else trainer.module


def load_resharded(trainer, path: str) -> CheckpointView:
    """Restore `trainer` from checkpoint directory `path` of any layout; returns the view read
    (its meta.json gives the step and losses, its rank 0 the RNG state)."""
    view = open_checkpoint(path)
    written = (view.meta.get("optim") or {}).get("name")
    if written is not None and written != trainer.cfg.optim.name:
        raise CheckpointError(f"optim.name: checkpoint {path} holds {written} state; resume it with optim={written}")
    module = module_of(trainer)
    slices = trainer.global_slices()
    params = dict(module.named_parameters())
    values = {local: view.tensor(where.name, rows=where.rows) for local, where in slices.items()}
    _check_shapes(path, params, values, slices)
    engine = getattr(trainer, "engine", None)
    optimizer = engine.optimizer if engine is not None else trainer.optimizer
    with torch.no_grad():
        for local, value in values.items():
            params[local].copy_(value)  # the bf16 module of a bf16 run rounds the fp32 value, as a step does
    if isinstance(optimizer, torch.optim.Optimizer):
        _load_torch_optimizer(view, optimizer, list(slices.items()), params)
    else:
        _load_deepspeed_optimizer(view, optimizer, slices, values, params)
    trainer.scheduler.load_state_dict(view.scheduler)
    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the step about to run uses the schedule's value at the checkpoint's step
    if engine is not None:
        step = int(view.meta["step"])
        engine.global_steps = step
        samples = (view.rank0 or {}).get("global_samples")
        engine.global_samples = samples if isinstance(samples, int) else step * trainer.cfg.train.global_batch_size
    return view


def _check_shapes(path: str, params: dict, values: dict, slices: dict[str, GlobalSlice]) -> None:
    for local, value in values.items():
        if tuple(value.shape) != tuple(params[local].shape):
            raise CheckpointError(f"train.resume: {path} holds {slices[local].key} as {tuple(value.shape)}, this run's "
                             f"{local} is {tuple(params[local].shape)}: the checkpoint is of another model shape")


def _state_of(view: CheckpointView, where: GlobalSlice) -> dict[str, torch.Tensor]:
    """Optimizer state of one local parameter: its slice of every kind, and the step count."""
    state: dict[str, torch.Tensor] = {k: view.tensor(where.name, k, rows=where.rows) for k in view.kinds(where.name)}
    step = view.step(where.name)
    if step is not None and state:
        state["step"] = torch.tensor(step, dtype=torch.float32)  # what torch's AdamW keeps (not capturable)
    return state


def _load_torch_optimizer(view: CheckpointView, optimizer: torch.optim.Optimizer, slices: list, params: dict) -> None:
    order = [p for g in optimizer.param_groups for p in g["params"]]
    if [id(p) for p in order] != [id(params[local]) for local, _ in slices]:
        raise RuntimeError("the optimizer's parameters are not the module's in named_parameters order")
    sd = optimizer.state_dict()  # this run's hyperparameters; the schedule sets lr below
    sd["state"] = {}
    for index, (_, where) in enumerate(slices):
        state = _state_of(view, where)
        if state:
            sd["state"][index] = state
    optimizer.load_state_dict(sd)  # copies, and casts to each parameter's device and dtype


def _load_deepspeed_optimizer(view: CheckpointView, optimizer, slices: dict[str, GlobalSlice], values: dict,
                              params: dict) -> None:
    """BF16_Optimizer / ZeRO-1/2: write this rank's fragment of each parameter into its fp32 master
    partition and into the partition's optimizer state (created here: DeepSpeed builds it lazily
    at the first step)."""
    partitions = _master_partitions(optimizer)
    if len(partitions) != 1:
        raise CheckpointError("train.resume: resharding into DeepSpeed's optimizer supports one parameter group")
    master = partitions[0]
    inner = optimizer.optimizer
    kinds: dict[str, torch.Tensor] = {}
    step = None
    for local, where in slices.items():
        mapping = getattr(params[local], "_hp_mapping", None)
        if mapping is None:
            continue  # a parameter none of whose elements this rank's partition holds
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        with torch.no_grad():
            master.narrow(0, hp.start, hp.numel).copy_(values[local].reshape(-1).narrow(0, lp.start, lp.numel))
        for kind, tensor in _state_of(view, where).items():
            if kind == "step":
                step = tensor
                continue
            flat = kinds.setdefault(kind, torch.zeros_like(master))
            flat.narrow(0, hp.start, hp.numel).copy_(tensor.reshape(-1).narrow(0, lp.start, lp.numel))
    if kinds:
        inner.state[master] = {"step": step if step is not None else torch.tensor(float(view.meta["step"])),
                               **{k: v.detach() for k, v in kinds.items()}}


def _master_partitions(optimizer) -> list[torch.Tensor]:
    for attr in ("fp32_groups_flat_partition", "single_partition_of_fp32_groups"):  # BF16_Optimizer, ZeRO
        if hasattr(optimizer, attr):
            return getattr(optimizer, attr)
    raise CheckpointError(f"train.resume: cannot reshard into optimizer {type(optimizer).__name__}; resume in the "
                          "layout that wrote the checkpoint")
