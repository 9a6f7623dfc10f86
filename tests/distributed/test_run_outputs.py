"""What a run writes: W&B offline records, metrics.jsonl, summary.json; and `make run` itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli, train_run
from wandb_reader import find_run_files, read_run

from vptrain.config import load
from vptrain.resolved import resolve
from vptrain.schedule import parse_schedule

pytestmark = pytest.mark.distributed

SECRET = "vptrain-test-key-0123456789abcdef0123456789abcdef"


def test_wandb_offline_run_has_config_metrics_and_never_the_key(tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(WANDB_API_KEY=SECRET)
    summary = train_run(run_dir, "layout.pp=2", "train.steps=4", "logger=wandb", "logger.mode=offline",
                        "method=baseline", "train.record_passes=true", "logger.system_metrics_interval_s=0.2", env=env)
    files = find_run_files(str(run_dir))
    assert len(files) == 1, "one W&B run per job"
    run = read_run(files[0])
    assert run.exit_code == 0, "wandb.finish() was called"
    assert run.config["model"]["vocab_size"] == 512 and run.config["layout"]["pp"] == 2
    assert run.name == "layout.pp=2,train.steps=4,method=baseline,train.record_passes=true" and run.group == "default"
    assert run.tags == ["method:baseline", "schedule:1f1b", "pp:2", "dp:1"]
    # At step 0, before the first row: the schedule the run executes, as `vptrain plan` draws it.
    assert run.history[0]["_step"] == 0 and run.history[0]["plan/schedule/_type"] == "image-file"
    assert (run_dir / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step     4/4 | loss" in run.console, "W&B captures the console"
    assert run.stats and "proc.memory.rssMB" in run.stats[0], "W&B samples system metrics"
    losses = [h["train/loss"] for h in run.history if "train/loss" in h]
    assert losses == summary["losses"]
    steps = [h["_step"] for h in run.history if "train/loss" in h]
    assert steps == [1, 2, 3, 4], "W&B counts steps as the console does"
    # W&B holds the resolved plan the run executed, and the trainer ran it: DeepSpeed's own 1F1B
    # engine runs the baseline, so its compute passes (F<mb>, B<mb>) are what it records.
    plan = resolve(load(str(run_dir / "config.yaml")))
    assert run.config["plan"] == plan.summary()
    assert run.config["plan"]["stage_layers"] == run.config["derived"]["layers_per_stage"] == [2, 2]
    for stage, row in enumerate(plan.schedule.compute_only()):
        executed = (run_dir / "passes" / f"stage{stage}_dp0.txt").read_text().splitlines()
        assert executed == [" ".join(map(str, row))] * 4
    for key in ("throughput/tokens_per_s", "throughput/mfu", "memory/stage_0/params_bytes", "memory/stage_1/peak_bytes",
                "time/stage_1/busy_s", "train/lr", "train/grad_norm", "time/iteration_s"):
        assert key in run.history[-1], key
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key leaked into {path}"


@pytest.fixture(scope="module")
def default_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`make run`, the README's first command (the embedded default job: vocab-2, pp=2), recording
    the passes each rank executed. Both tests below read this one run."""
    run_dir = tmp_path_factory.mktemp("make-run") / "run"
    proc = subprocess.run(["make", "-s", "run", f"ARGS=hydra.run.dir={run_dir} train.record_passes=true"], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_metrics_and_summary_files_and_the_plan_is_what_ran(default_job, tmp_path):
    run_dir, _ = default_job
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = load(str(run_dir / "config.yaml")).train.steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert summary["losses"] == [r["train/loss"] for r in rows]
    assert summary["median_iter_time_s"] > 0 and summary["tokens_per_s"] > 0
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    for stage in summary["stages"]:
        assert stage["params"] > 0 and stage["peak_memory_bytes"] > 0
    saved = (run_dir / "config.yaml").read_text()
    assert "pp: 2" in saved and "run_dir:" in saved
    # DESIGN.md invariant 8: every rank executed its line of `vptrain plan`'s schedule.txt, every step.
    run_cli("plan", "train.record_passes=true", f"hydra.run.dir={tmp_path / 'plan'}", check=True, timeout=120)
    planned = parse_schedule((tmp_path / "plan" / "schedule.txt").read_text())
    assert planned.method == "vocab-2" and planned.p == 2
    for stage, row in enumerate(planned.ranks):
        executed = (run_dir / "passes" / f"stage{stage}_dp0.txt").read_text().splitlines()
        assert executed == [" ".join(map(str, row))] * steps, f"rank {stage} did not run its line of schedule.txt"


def test_make_run_default_job(default_job):
    """The README's first command: trains the embedded default and shows a falling loss."""
    run_dir, proc = default_job
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pp"] == 2
    assert summary["final_loss"] < summary["losses"][0] - 1.0, "the default job must visibly learn"
    assert "tok/s" in proc.stdout and "Per-stage summary" in proc.stdout
    assert find_run_files(str(run_dir)), "the default job logs to W&B (offline)"
    # The console lines go through logging: Hydra's cli.log keeps them, with a time stamp; the
    # console shows them as printed; off a terminal there is no progress bar.
    steps = load(str(run_dir / "config.yaml")).train.steps
    last = f"step {steps:>5}/{steps} | loss"
    assert f"\n{last}" in proc.stdout and "@vptrain-progress" not in proc.stdout and "\r" not in proc.stdout
    logged = [line for line in (run_dir / "cli.log").read_text().splitlines() if last in line]
    assert len(logged) == 1 and logged[0].startswith("[20") and "[vptrain][INFO]" in logged[0], logged


def test_a_terminal_gets_a_progress_bar_under_the_step_lines(tmp_path):
    """On a terminal the launcher keeps a bar at the bottom, fed by the logging rank's per-step
    markers, which reach neither the console's lines nor the rank's log."""
    import os
    import pty

    primary, secondary = pty.openpty()
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "vptrain.cli", "train", f"hydra.run.dir={run_dir}", "train.steps=6",
            "train.log_every=3", "logger=none"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL, stdout=secondary,
                            stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closes when the last writer exits
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=300) == 0, screen.decode(errors="replace")[-3000:]
    os.close(primary)
    text = screen.decode(errors="replace")
    for done in range(1, 7):
        assert f"] {done}/6 steps" in text, f"no bar at step {done}"
    assert "[" + "#" * 30 + "] 6/6 steps" in text and "@vptrain-progress" not in text
    assert "step     3/6 | loss" in text and "step     6/6 | loss" in text
    assert "@vptrain-progress" not in (run_dir / "logs" / "rank_0.log").read_text()
