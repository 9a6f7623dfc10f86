"""Atomic, resumable checkpoints.

Layout under run_dir/checkpoints/:
    step_00000012/rank_<r>.pt   every rank's own state (its stage's parameters, incl. vocabulary
                                shards, optimizer state, LR schedule, RNG)
    step_00000012/meta.json     step, per-step losses so far, layout; written last
    latest                      name of the newest complete checkpoint

A checkpoint is first written to a hidden temporary directory and renamed into place by rank 0
after every rank has finished writing (a barrier), then `latest` is replaced atomically. A crash
at any moment leaves the previous checkpoint and `latest` intact; a half-written directory is
never named by `latest` and is removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from vptrain.config import RunConfig

KEEP = 2


def checkpoint_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.run_dir, "checkpoints")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(cfg: RunConfig, trainer, *, step: int, losses: list[float]) -> str:
    """Collective: every rank calls it after finishing optimizer step `step` (1-based count of
    completed steps). Returns the checkpoint directory."""
    root = checkpoint_root(cfg)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp_{name}")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = trainer.checkpoint_state()
    state["rng"] = rng_state()
    torch.save(state, os.path.join(tmp, f"rank_{rank}.pt"))
    _barrier()
    if rank == 0:
        meta = {"step": step, "losses": losses, "pp": cfg.layout.pp, "dp": cfg.layout.dp, "method": cfg.method.name,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, "latest"), name)
        _prune(root, keep=KEEP)
    _barrier()
    return final


def latest(cfg: RunConfig) -> str | None:
    path = os.path.join(checkpoint_root(cfg), "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    found = os.path.join(checkpoint_root(cfg), name)
    return found if os.path.exists(os.path.join(found, "meta.json")) else None


def resolve_resume(cfg: RunConfig) -> str | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return latest(cfg)
    return cfg.train.resume


def load(cfg: RunConfig, trainer, path: str) -> dict:
    """Restore this rank's state from checkpoint directory `path`; returns its meta.json."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world or meta["pp"] != cfg.layout.pp:
        raise ValueError(
            f"train.resume: checkpoint {path} was written with pp={meta['pp']} on {meta['world_size']} ranks; "
            f"this run has pp={cfg.layout.pp} on {world}. Resume with the same layout."
        )
    state = torch.load(os.path.join(path, f"rank_{_rank()}.pt"), weights_only=False)
    trainer.load_checkpoint_state(state)
    set_rng_state(state["rng"])
    return meta


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: str, *, keep: int) -> None:
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in complete[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for d in os.listdir(root):
        if d.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
