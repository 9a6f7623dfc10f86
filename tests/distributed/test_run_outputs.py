"""What a run writes: W&B offline records, metrics.jsonl, summary.json; and `make run` itself."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, cli_env, train_run
from wandb_reader import find_run_files, read_run

pytestmark = pytest.mark.distributed

SECRET = "vptrain-test-key-0123456789abcdef0123456789abcdef"


def test_wandb_offline_run_has_config_metrics_and_never_the_key(tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(WANDB_API_KEY=SECRET)
    summary = train_run(run_dir, "layout.pp=2", "train.steps=4", "logger=wandb", "logger.mode=offline",
                        "method=baseline", env=env)
    files = find_run_files(str(run_dir))
    assert len(files) == 1, "one W&B run per job"
    run = read_run(files[0])
    assert run.exit_code == 0, "wandb.finish() was called"
    assert run.config["model"]["vocab_size"] == 512 and run.config["layout"]["pp"] == 2
    assert run.name == "layout.pp=2,train.steps=4,method=baseline" and run.group == "default"
    losses = [h["loss"] for h in run.history if "loss" in h]
    assert losses == pytest.approx(summary["losses"])
    for key in ("tokens_per_s", "mfu", "memory/stage_0/params", "memory/stage_1/peak", "time/stage_1/busy"):
        assert key in run.history[-1], key
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key leaked into {path}"


def test_metrics_and_summary_files(tmp_path):
    summary = train_run(tmp_path, "layout.pp=2", "train.steps=3", "logger=none")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert summary["losses"] == [r["loss"] for r in rows]
    assert summary["median_iter_time_s"] > 0 and summary["tokens_per_s"] > 0
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    for stage in summary["stages"]:
        assert stage["params"] > 0 and stage["peak_memory_bytes"] > 0
    saved = (tmp_path / "config.yaml").read_text()
    assert "pp: 2" in saved and "run_dir:" in saved


def test_make_run_default_job(tmp_path):
    """The README's first command: trains the embedded default and shows a falling loss."""
    run_dir = tmp_path / "make-run"
    proc = subprocess.run(["make", "-s", "run", f"ARGS=hydra.run.dir={run_dir}"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pp"] == 2
    assert summary["final_loss"] < summary["losses"][0] - 1.0, "the default job must visibly learn"
    assert "tok/s" in proc.stdout and "Per-stage summary" in proc.stdout
    assert find_run_files(str(run_dir)), "the default job logs to W&B (offline)"
