"""W&B without surprises, in-process with real offline runs: WANDB_MODE in the environment wins
over logger.mode and a configured key; a new run in an old directory is a new W&B run; only a
resume continues one (the id comes from the checkpoint, tests/distributed/test_resume_and_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_checkpoint_safety import make_cfg
from wandb_reader import find_run_files, read_run

from vptrain.wandb_logger import WandbLogger, resolve_mode

KEY = "vptrain-test-key-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(("env", "mode", "expected"), [
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": KEY}, "online", "offline"),
    ({"WANDB_MODE": "dryrun", "WANDB_API_KEY": KEY}, "auto", "offline"),  # wandb's legacy name
    ({"WANDB_MODE": "disabled"}, "offline", "disabled"),
    ({"WANDB_MODE": "Online"}, "offline", "online"),
    ({}, "offline", "offline"),
])
def test_the_environments_wandb_mode_wins(tmp_path, env, mode, expected):
    assert resolve_mode(make_cfg(tmp_path, f"logger.mode={mode}"), environ=env) == expected


def test_an_unknown_wandb_mode_names_the_variable(tmp_path):
    with pytest.raises(ValueError, match="WANDB_MODE=ofline"):
        resolve_mode(make_cfg(tmp_path), environ={"WANDB_MODE": "ofline"})


def log_one(run_dir: Path, resume_id: str | None = None) -> str:
    logger = WandbLogger(make_cfg(run_dir, "logger=wandb", "logger.mode=online"), config={"k": 1},
                         resume_id=resume_id)
    logger.log({"loss": 1.0}, step=0)
    logger.finish()
    import wandb

    wandb.teardown()  # the service flushes a finished run's file fully only when it stops (a job's exit)
    return logger.run_id


def test_fresh_runs_get_new_ids_a_resume_keeps_its_own_and_offline_env_wins_over_a_key(tmp_path, monkeypatch):
    # logger.mode=online and a key: without the environment winning, wandb would try the network.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    first, second = log_one(run_dir), log_one(run_dir)
    assert first != second, "a fresh run in an old run directory must not append to the old W&B run"
    resumed = log_one(run_dir, resume_id=first)
    assert resumed == first
    runs = [read_run(f) for f in find_run_files(str(run_dir))]
    assert sorted(r.run_id for r in runs) == sorted([first, second, first])
    assert all(r.exit_code == 0 for r in runs), "each run finished (offline: no network, no key check)"
