"""The training loop's resume rules, in-process on the single-process trainer (layout.pp=1, no
process group): a lost `latest` falls back to the newest complete checkpoint and says so, a
train.stop_at_step already passed stops before training, metrics.jsonl keeps each step once, and
the resumed losses equal the uninterrupted run's. The DeepSpeed engines' resume is in
tests/distributed/test_resume_and_faults.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoint_safety import make_cfg

from vptrain.launch.env import LaunchEnv
from vptrain.train import TrainingError, train_worker

ONE_RANK = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # train_worker sets launcher.threads_per_rank
    yield
    torch.set_num_threads(threads)


def train(run_dir: Path, *overrides: str) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    return train_worker(make_cfg(run_dir, *overrides), ONE_RANK)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_losing_the_newest_checkpoint(tmp_path, console):
    full = train(tmp_path / "full", "train.checkpoint_every=2")
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "full", split)
    shutil.rmtree(split / "checkpoints" / "step_00000004")  # `latest` now names a missing directory
    step2 = split / "checkpoints" / "step_00000002"
    console.read()

    stopped = train(split, "train.resume=auto", "train.stop_at_step=1")
    out = console.read()
    assert f"resuming from the newest complete checkpoint, {step2}" in out, out
    assert "train.stop_at_step=1 is already passed (resumed at step 2): stopping without training" in out, out
    assert stopped["losses"] == full["losses"][:2]
    assert logged_steps(split) == [1, 2], "the steps after the checkpoint are dropped from metrics.jsonl"
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["latest", "step_00000002"]

    resumed = train(split, "train.resume=auto")
    assert resumed["losses"] == full["losses"]
    assert logged_steps(split) == [1, 2, 3, 4]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"


def test_stop_at_step_stops_once_reached(tmp_path, console):
    stopped = train(tmp_path, "train.stop_at_step=3")
    assert len(stopped["losses"]) == 3 and (tmp_path / "checkpoints" / "step_00000003").is_dir()
    assert "stopping at step 3 (train.stop_at_step)" in console.read()


def test_a_non_finite_loss_names_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="loss is (nan|inf)") as err:
        train(tmp_path, "train.steps=8", "train.checkpoint_every=1", "optim=sgd", "optim.lr=1e12",
              "train.grad_clip=0")
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert f"The last checkpoint with finite weights is {tmp_path / 'checkpoints' / latest}" in str(err.value)
