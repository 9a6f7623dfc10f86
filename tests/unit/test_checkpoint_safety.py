"""Checkpoints in-process: a planted pickle never runs, a lost `latest` falls back to the newest
complete checkpoint, non-finite weights are never saved, files reach the disk before the rename,
and metrics.jsonl of a resumed run keeps each step once. The single-process trainer (layout.pp=1)
is real; the distributed resume paths are in tests/distributed/test_resume_and_faults.py."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vptrain import checkpoint
from vptrain.checkpoint import CheckpointError
from vptrain.config import RunConfig, register_configs
from vptrain.data import StepData
from vptrain.engine.single import SingleProcessTrainer
from vptrain.metrics import RunMetrics

CPU = torch.device("cpu")


def make_cfg(run_dir: Path, *overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=["layout.pp=1", "logger=none", "train.steps=4",
                                            "train.global_batch_size=2", *overrides])
    dcfg.run_dir = str(run_dir)
    return OmegaConf.to_object(dcfg)


class WritesAFile:
    """Unpickling this creates `path`: what a planted checkpoint would do with os.system."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(cfg: RunConfig, payload: object, *, form: str) -> Path:
    """A checkpoint directory that looks complete (valid meta.json, `latest` names it) whose
    rank file is the payload, written by torch.save (zip) or as a bare pickle."""
    ckpt = Path(checkpoint.checkpoint_root(cfg)) / "step_00000002"
    ckpt.mkdir(parents=True)
    meta = {"step": 2, "losses": [6.0, 5.9], "pp": 1, "dp": 1, "method": cfg.method.name, "world_size": 1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    state = {"model": {}, "rng": payload}
    if form == "torch.save":
        torch.save(state, ckpt / "rank_0.pt")
    else:
        (ckpt / "rank_0.pt").write_bytes(pickle.dumps(state, protocol=2))
    (ckpt.parent / "latest").write_text(ckpt.name)
    return ckpt


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_planted_pickle_is_refused_naming_the_file_and_nothing_runs(tmp_path, form):
    probe = tmp_path / "payload-is-live"
    pickle.loads(pickle.dumps(WritesAFile(probe)))
    assert probe.exists(), "the payload must really act when unpickled, or the test proves nothing"

    marker = tmp_path / "marker"
    cfg = make_cfg(tmp_path / "run", "train.resume=auto")
    ckpt = plant(cfg, WritesAFile(marker), form=form)
    assert checkpoint.resolve_resume(cfg) == str(ckpt)
    trainer = SingleProcessTrainer(cfg, device=CPU)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "rank_0.pt"))) as err:
        checkpoint.load(cfg, trainer, str(ckpt))
    assert "refusing to load" in str(err.value) and "Nothing in it was run" in str(err.value)
    # The allowance for DeepSpeed's state types (pipeline runs) opens no door either.
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoint.load_rank_file(str(ckpt / "rank_0.pt"), deepspeed_state=True)
    assert not marker.exists(), "loading the checkpoint ran its payload"


def test_deepspeed_state_types_load_only_where_deepspeed_wrote_them(tmp_path):
    from vptrain.engine.deepspeed_setup import import_deepspeed

    import_deepspeed("cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"optimizer": {"param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}],
                           "loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(1)},
             "rng": {"torch": torch.get_rng_state()}}
    path = tmp_path / "rank_0.pt"
    torch.save(state, path)
    loaded = checkpoint.load_rank_file(str(path), deepspeed_state=True)["optimizer"]
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=6, start=2)
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["zero_stage"] is ZeroStageEnum(1)
    with pytest.raises(CheckpointError, match="fragment_address"):
        checkpoint.load_rank_file(str(path), deepspeed_state=False)  # a single-process run needs none of them


def train(trainer, cfg: RunConfig, steps: range) -> list[float]:
    data = StepData(cfg)
    return [trainer.train_step(data.microbatches(step, 0)).loss for step in steps]


def test_save_then_load_continues_bitwise(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    torch.manual_seed(0)
    first = SingleProcessTrainer(cfg, device=CPU)
    train(first, cfg, range(2))
    path = checkpoint.save(cfg, first, step=2, losses=[0.0, 0.0], wandb_run_id="abc123")
    assert checkpoint.read_meta(path)["wandb_run_id"] == "abc123"
    after = train(first, cfg, range(2, 4))

    torch.manual_seed(99)  # a different start: everything must come from the checkpoint
    second = SingleProcessTrainer(cfg, device=CPU)
    checkpoint.load(cfg, second, path)
    assert train(second, cfg, range(2, 4)) == after
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_non_finite_weights_are_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    trainer = SingleProcessTrainer(cfg, device=CPU)
    good = checkpoint.save(cfg, trainer, step=1, losses=[1.0])
    bad_name, bad = list(trainer.model.named_parameters())[-1]
    with torch.no_grad():
        bad.view(-1)[1] = float("inf")
    with pytest.raises(CheckpointError) as err:
        checkpoint.save(cfg, trainer, step=2, losses=[1.0, 1.0])
    assert bad_name in str(err.value) and f"last checkpoint with finite weights is {good}" in str(err.value)
    assert checkpoint.latest(cfg) == good
    assert not os.path.exists(os.path.join(checkpoint.checkpoint_root(cfg), "step_00000002"))


def fake_checkpoint(root: Path, step: int, *, world: int = 2, ranks: int | None = None, meta: bool = True) -> Path:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    if meta:
        (d / "meta.json").write_text(json.dumps({"step": step, "losses": [1.0] * step, "world_size": world, "pp": 2}))
    for r in range(world if ranks is None else ranks):
        (d / f"rank_{r}.pt").write_bytes(b"state")
    return d


def test_latest_naming_a_missing_directory_falls_back_to_the_newest_complete_one(tmp_path):
    cfg = make_cfg(tmp_path / "run", "train.resume=auto")
    root = Path(checkpoint.checkpoint_root(cfg))
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 4)
    fake_checkpoint(root, 6, ranks=1)  # a rank file short: incomplete
    fake_checkpoint(root, 7, meta=False)  # renamed before its meta.json: impossible, but not a checkpoint
    (root / "latest").write_text("step_00000008")  # deleted by hand, or lost
    heard: list[str] = []
    assert checkpoint.resolve_resume(cfg, report=heard.append) == str(newest)
    assert len(heard) == 1 and "step_00000008" in heard[0] and str(newest) in heard[0], heard

    (root / "latest").write_text("step_00000004")  # the normal case says nothing
    heard.clear()
    assert checkpoint.resolve_resume(cfg, report=heard.append) == str(newest) and heard == []


def test_no_complete_checkpoint_means_step_0_and_says_so(tmp_path):
    cfg = make_cfg(tmp_path / "run", "train.resume=auto")
    root = Path(checkpoint.checkpoint_root(cfg))
    fake_checkpoint(root, 2, ranks=0)
    (root / "latest").write_text("step_00000002")
    found = checkpoint.find_latest(cfg)
    assert found.path is None and "starting from step 0" in found.note
    assert checkpoint.find_latest(make_cfg(tmp_path / "fresh")).note is None  # a fresh directory: nothing to say


def test_every_file_and_directory_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch):
    """A spy around the real os.fsync / os.replace: records which path each call concerns."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cfg = make_cfg(tmp_path / "run")
    checkpoint.save(cfg, SingleProcessTrainer(cfg, device=CPU), step=3, losses=[1.0, 1.0, 1.0])
    root = os.path.realpath(checkpoint.checkpoint_root(cfg))
    tmp = os.path.join(root, ".tmp_step_00000003")
    order = [(kind, os.path.realpath(p)) for kind, p in events]
    rename = order.index(("replace", tmp))
    synced_before = {p for kind, p in order[:rename] if kind == "fsync"}
    assert {os.path.join(tmp, "rank_0.pt"), os.path.join(tmp, "meta.json"), tmp} <= synced_before, order
    assert ("fsync", root) in order[rename:], "the rename itself is made durable"
    latest = order.index(("replace", os.path.join(root, "latest.tmp")))
    assert ("fsync", os.path.join(root, "latest.tmp")) in order[:latest] and ("fsync", root) in order[latest:]


def test_a_resumed_run_keeps_each_step_once_in_metrics_jsonl(tmp_path):
    cfg = make_cfg(tmp_path)
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": 11.0 - s}) for s in range(1, 7)]
    path.write_text("\n".join(rows) + '\n{"step": 7, "tr')  # a crash mid-line in step 7
    metrics = RunMetrics(cfg, is_logger=True, world_size=1)
    metrics.restore([10.0, 9.0, 8.0])  # resumed from the checkpoint after step 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    RunMetrics(cfg, is_logger=False, world_size=1).restore([])  # only the logging rank writes the file
    assert len(path.read_text().splitlines()) == 3
    metrics.restore([])  # a fresh start in an old run directory
    assert path.read_text() == ""
