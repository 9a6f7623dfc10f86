"""Atomic, resumable checkpoints that cannot run code when loaded.

Layout under run_dir/checkpoints/:
    step_00000012/rank_<r>.pt   every rank's own state (its stage's parameters, incl. vocabulary
                                shards, optimizer state, LR schedule, RNG)
    step_00000012/meta.json     step, per-step losses so far, layout, W&B run id; written last
    latest                      name of the newest complete checkpoint

A checkpoint is first written to a hidden temporary directory and renamed into place by rank 0
after every rank has finished writing (a barrier), then `latest` is replaced atomically; every
file and both directories are fsynced first, so a power loss cannot leave a renamed directory
whose files are still only in the page cache. A crash at any moment leaves the previous
checkpoint and `latest` intact; a half-written directory is never named by `latest` and is
removed by the next save. A checkpoint whose weights are not all finite is never written, so
`latest` always names weights a run can continue from.

A run of the layout that wrote a checkpoint restores it as saved (bitwise); a run of another layout
reshards it (vptrain/reshard.py, reading it as the single-process model: vptrain/checkpoint_global.py),
from what meta.json records (`written_by`) and each rank file's `param_slices` and `coord`.

Rank files are read with `torch.load(weights_only=True)`: tensors and plain containers, plus the
few data-only DeepSpeed types its optimizers put in their state dicts, allowed for that one load.
A file that needs anything else (a planted pickle, a class from elsewhere) is refused unread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vptrain.config import RunConfig

KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unsafe, or unfinished): the message names the file."""


def checkpoint_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.run_dir, "checkpoints")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(cfg: RunConfig, trainer, *, step: int, losses: list[float], wandb_run_id: str | None = None) -> str:
    """Collective: every rank calls it after finishing optimizer step `step` (1-based count of
    completed steps). Returns the checkpoint directory. Raises CheckpointError on every rank,
    writing nothing, when any rank's weights or optimizer state are no longer finite."""
    root = checkpoint_root(cfg)
    name = f"step_{step:08d}"
    state = trainer.checkpoint_state()
    _refuse_non_finite(cfg, state, step=step)
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp_{name}")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state["rng"] = rng_state()
    # What each parameter is in the single-process model, in the optimizer's order: a run of another
    # layout reshards from it (vptrain/reshard.py), `vptrain export-hf` assembles from it.
    state["param_slices"] = [[local, *s.to_list()] for local, s in trainer.global_slices().items()]
    state["coord"] = {"stage": trainer.stage, "dp_rank": trainer.dp_rank}
    with open(os.path.join(tmp, f"rank_{rank}.pt"), "wb") as f:
        torch.save(state, f)
        _sync_file(f)
    _barrier()
    if rank == 0:
        meta = {"step": step, "losses": losses, "pp": cfg.layout.pp, "dp": cfg.layout.dp, "method": cfg.method.name,
                "world_size": _world(), "wandb_run_id": wandb_run_id, **written_by(cfg)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
            _sync_file(f)
        sync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sync_dir(root)
        _write_atomic(os.path.join(root, "latest"), name)
        _prune(root, keep=KEEP)
    _barrier()
    return final


def written_by(cfg: RunConfig) -> dict:
    """What meta.json records about the run that wrote a checkpoint: the model's shape (a run of
    another shape cannot continue it), the layout and the optimizer (a run of another layout
    reshards; vptrain/reshard.py), and where its data came from (export copies the tokenizer)."""
    from vptrain.resolved import vocab_shards

    return {
        "schedule": cfg.schedule.name,
        "precision": cfg.precision,
        "model": dataclasses.asdict(cfg.model),
        "vocab_rows": vocab_shards(cfg).rows,
        "optim": {"name": cfg.optim.name, "zero_stage": cfg.optim.zero_stage},
        "data": {"name": cfg.data.name, "path": cfg.data.path},
        "steps": cfg.train.steps,
    }


def read_meta(path: str) -> dict | None:
    """meta.json of checkpoint directory `path`, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(path: str) -> bool:
    """A readable meta.json and a non-empty file for every rank it names."""
    meta = read_meta(path)
    if meta is None or not isinstance(meta.get("world_size"), int) or not isinstance(meta.get("step"), int):
        return False
    files = (os.path.join(path, f"rank_{r}.pt") for r in range(meta["world_size"]))
    return all(os.path.isfile(f) and os.path.getsize(f) > 0 for f in files)


@dataclass(frozen=True)
class Found:
    path: str | None
    note: str | None = None  # why it is not what `latest` names, when it is not


def find_latest(cfg: RunConfig) -> Found:
    """The checkpoint `latest` names when it is complete; otherwise the newest complete one, with
    a note saying so (a crash between renaming a checkpoint and updating `latest`, or a
    checkpoint deleted by hand, must not silently restart the run from step 0)."""
    root = checkpoint_root(cfg)
    pointer = os.path.join(root, "latest")
    named = None
    if os.path.exists(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and is_complete(os.path.join(root, named)):
            return Found(os.path.join(root, named))
    complete = sorted(d for d in _listdir(root) if d.startswith("step_") and is_complete(os.path.join(root, d)))
    if named is None and not complete:
        return Found(None)
    why = f"{pointer} names {named}, which is missing or incomplete" if named is not None else f"{pointer} is missing"
    if not complete:
        return Found(None, f"{why}, and no complete checkpoint is there: starting from step 0")
    newest = os.path.join(root, complete[-1])
    return Found(newest, f"{why}: resuming from the newest complete checkpoint, {newest}")


def latest(cfg: RunConfig) -> str | None:
    return find_latest(cfg).path


def resolve_resume(cfg: RunConfig, *, report: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint directory this run resumes from, or None. `report` hears why it is not the
    one `latest` names, when it is not."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        found = find_latest(cfg)
        if found.note and report is not None:
            report(f"train.resume=auto: {found.note}")
        return found.path
    return cfg.train.resume


def load(cfg: RunConfig, trainer, path: str) -> dict:
    """Restore this rank's state from checkpoint directory `path`; returns its meta.json. A
    checkpoint of this run's layout is restored as saved (bitwise); one of another layout (pp, dp,
    method, schedule, precision, ZeRO stage, vocabulary padding) is resharded (vptrain/reshard.py)."""
    from vptrain.reshard import can_reshard, holds_what_trainer_holds, layout_differences, load_resharded

    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(f"train.resume: {os.path.join(path, 'meta.json')} is missing or not valid JSON")
    differ = layout_differences(cfg, meta, world_size=_world())
    if not differ:
        state = load_rank_file(os.path.join(path, f"rank_{_rank()}.pt"), deepspeed_state=cfg.layout.pp > 1)
        if holds_what_trainer_holds(state, trainer):
            trainer.load_checkpoint_state(state)
            set_rng_state(state["rng"])
            return meta
        differ = ["which parameters each rank holds (layout.layers_per_stage)"]
    if not can_reshard(meta):
        raise ValueError(
            f"train.resume: checkpoint {path} was written by another layout ({', '.join(differ)}) before checkpoints "
            f"recorded which part of the model each rank holds, so it cannot be resharded; resume it with the layout "
            f"that wrote it (pp={meta.get('pp')}, dp={meta.get('dp')}, method={meta.get('method')})")
    view = load_resharded(trainer, path)
    set_rng_state(view.rank0["rng"])
    return meta


def safe_state_types(*, deepspeed_state: bool) -> list[type]:
    """The non-tensor classes a rank file may hold. DeepSpeed's optimizer state dicts carry three
    data-only kinds: `fragment_address` (numel, start) per parameter in `param_slice_mappings`
    (BF16_Optimizer, ZeRO), ZeRO's static loss scaler (a scale; fp32 and bf16 never get the
    dynamic one) and its stage number (an int enum). Only the pipeline trainers (pp > 1) use
    DeepSpeed; the single-process trainer's state is plain torch."""
    if not deepspeed_state:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, ZeroStageEnum]


def load_rank_file(path: str, *, deepspeed_state: bool, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; the allowed extra types are scoped to this one call
    (no process-wide registration). `mmap`: tensors stay in the file until read (resharding reads
    only the rows it needs of every rank's file)."""
    try:
        with torch.serialization.safe_globals(safe_state_types(deepspeed_state=deepspeed_state)):
            state = torch.load(path, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"train.resume: {path} does not exist; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for anything not allowed
        raise CheckpointError(
            f"train.resume: refusing to load {path}: it holds objects other than tensors and plain data "
            f"({_first_line(err)}). Nothing in it was run. Use a checkpoint vptrain wrote, or delete the "
            f"directory to start over."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:  # a truncated or corrupt file
        raise CheckpointError(f"train.resume: cannot read {path} ({_first_line(err)}): "
                              f"the file is truncated or corrupt") from None
    if not isinstance(state, dict) or "rng" not in state:
        raise CheckpointError(f"train.resume: {path} is not a vptrain rank checkpoint (no RNG state)")
    return state


def _first_line(err: Exception) -> str:
    """The reason in torch's long weights-only message (the rest is advice that does not apply)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    boilerplate = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(boilerplate)] or paragraphs
    return useful[0].splitlines()[0].split(". ")[0].rstrip(".")[:300] if useful else type(err).__name__


def _floating_tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floating_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floating_tensors(v, f"{prefix}/{i}")


def first_non_finite(state: dict) -> str | None:
    """Name of the first floating tensor in `state` holding a NaN or an infinity, else None."""
    for name, t in _floating_tensors(state):
        if not bool(torch.isfinite(t).all()):  # a save is rare: one host sync per tensor is fine
            return name
    return None


def _refuse_non_finite(cfg: RunConfig, state: dict, *, step: int) -> None:
    bad = first_non_finite(state)
    everyone: list = [None] * _world()
    if dist.is_initialized() and _world() > 1:
        dist.all_gather_object(everyone, bad)  # collective: every rank decides the same way
    else:
        everyone = [bad]
    offenders = [(r, name) for r, name in enumerate(everyone) if name is not None]
    if offenders:
        where = ", ".join(f"rank {r}: {name}" for r, name in offenders[:4])
        raise CheckpointError(f"step {step}: the weights are no longer finite ({where}); not saving a checkpoint. "
                              f"{last_good_note(cfg)}")


def last_good_note(cfg: RunConfig) -> str:
    """Which checkpoint a run that went non-finite can continue from (every saved one is finite)."""
    found = latest(cfg)
    if found is None:
        return "No checkpoint with finite weights was saved in this run directory."
    return f"The last checkpoint with finite weights is {found}; resume from it with train.resume=auto."


def _sync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def sync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        _sync_file(f)
    os.replace(tmp, path)
    sync_dir(os.path.dirname(path))


def _listdir(root: str) -> list[str]:
    try:
        return os.listdir(root)
    except FileNotFoundError:
        return []


def _prune(root: str, *, keep: int) -> None:
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in complete[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for d in os.listdir(root):
        if d.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
