"""The per-step row: the ecosystem's names, steps counted from 1 everywhere, MFU against the peak
of the precision that ran, and gradient memory as it stands at the step's peak."""

from __future__ import annotations

import json

import pytest
import torch
from test_config import compose_cfg

from vptrain.data import StepData
from vptrain.engine.single import SingleProcessTrainer
from vptrain.flops import peak_tflops, step_flops
from vptrain.metrics import RunMetrics

STAGES = [{"stage": 0, "busy_s": 0.25, "instr_s": {"step": 0.5}, "memory": {"params": 8, "peak": 24}, "params": 2}]
ROW_NAMES = {"step", "train/loss", "train/lr", "train/grad_norm", "time/iteration_s", "throughput/tokens_per_s",
             "throughput/tflops_per_device", "throughput/mfu", "time/stage_0/busy_s", "time/stage_0/instr_step_s",
             "memory/stage_0/params_bytes", "memory/stage_0/peak_bytes"}


def test_rows_use_the_ecosystem_names_and_count_steps_from_one(tmp_path, console):
    cfg = compose_cfg("logger=none", "train.steps=3", "train.log_every=2")
    cfg.run_dir = str(tmp_path)
    metrics = RunMetrics(cfg, is_logger=True, world_size=2)
    metrics.restore([])
    for step in range(3):
        metrics.record(step, loss=5.0 - step, lr=1e-3, grad_norm=0.5, iter_s=0.5, stages=STAGES)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [ROW_NAMES] * 3
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["train/loss"] for r in rows] == [5.0, 4.0, 3.0]
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    assert rows[0]["throughput/tokens_per_s"] == tokens / 0.5
    assert rows[0]["throughput/tflops_per_device"] == step_flops(cfg) / 0.5 / 2 / 1e12
    # The console counts as the file does: the first step, every log_every-th, the last.
    printed = [line.split("|")[0].split() for line in console.read().splitlines()]
    assert printed == [["step", "1/3"], ["step", "2/3"], ["step", "3/3"]]


@pytest.mark.parametrize(("profile", "precision", "peak"), [("a100", "fp32", 19.5), ("a100", "bf16", 312.0),
                                                            ("h100", "fp32", 67.0), ("h100", "bf16", 989.0)])
def test_mfu_uses_the_peak_of_the_precision_that_ran(tmp_path, profile, precision, peak):
    cfg = compose_cfg("logger=none", f"cluster.profile={profile}", f"precision={precision}")
    cfg.run_dir = str(tmp_path)
    assert peak_tflops(cfg) == peak
    metrics = RunMetrics(cfg, is_logger=False, world_size=1)
    row = metrics.record(0, loss=1.0, lr=1.0, grad_norm=None, iter_s=2.0, stages=STAGES)
    assert row["throughput/mfu"] == row["throughput/tflops_per_device"] / peak


def test_gradient_memory_reads_what_the_step_allocated_not_zero():
    """After a step the optimizer has released the gradients; the figure is what they held at
    the step's peak: one gradient per trainable parameter, of its size."""
    cfg = compose_cfg("logger=none", "layout.pp=1", "method=baseline", "train.steps=1")
    trainer = SingleProcessTrainer(cfg, device=torch.device("cpu"))
    trainer.train_step(StepData(cfg).microbatches(0, 0))
    trainer.optimizer.zero_grad(set_to_none=True)  # as the pipeline engine leaves them
    mem = trainer.memory_bytes()
    trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    assert mem["grads"] == trainable == mem["params"] > 0
