"""Eval windows (vptrain/data.py EvalWindows): window i = tokens[i*S : i*S + S + 1] in file order,
served a training batch at a time in every layout; the eval config rules (validate._check_eval);
eval/loss in metrics.jsonl and the summary (vptrain/metrics.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_config import compose_cfg

from vptrain.data import EvalBatches, write_token_file
from vptrain.metrics import RunMetrics
from vptrain.validate import validate
from vptrain.vocab.shard import IGNORE_INDEX

S = 8


@pytest.fixture
def token_file(tmp_path):
    tokens = np.random.default_rng(3).integers(0, 500, 1000)
    return tokens, write_token_file(str(tmp_path / "eval.bin"), tokens)


def _cfg(path: str, *overrides: str):
    return compose_cfg(f"data.eval_path={path}", "data.dtype=uint16", f"model.seq_len={S}",
                       "train.global_batch_size=8", *overrides)


def _windows_of_step(data, step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [mb for d in range(dp) for mb in data.microbatches(step, d)]
    return torch.cat([t for t, _ in parts]), torch.cat([lab for _, lab in parts])


@pytest.mark.parametrize("layout", [("layout.dp=1", "train.micro_batch_size=1"),
                                    ("layout.dp=2", "train.micro_batch_size=2"),
                                    ("layout.dp=2", "train.micro_batch_size=4")])
def test_eval_batches_cut_the_file_in_order_in_every_layout(token_file, layout):
    tokens, path = token_file
    cfg = _cfg(path, "eval.sequences=24", *layout)
    validate(cfg)
    data = EvalBatches(cfg)
    assert data.steps == 3
    for step in range(3):
        inputs, targets = _windows_of_step(data, step, cfg.layout.dp)
        for row in range(8):
            i = step * 8 + row  # the i-th window of the file
            window = torch.from_numpy(tokens[i * S : i * S + S + 1])
            assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


@pytest.mark.parametrize("layout", [("layout.dp=1", "train.micro_batch_size=1"),
                                    ("layout.dp=2", "train.micro_batch_size=2")])
def test_the_last_batch_is_filled_up_with_whole_microbatches_without_targets(token_file, layout):
    tokens, path = token_file
    cfg = _cfg(path, "eval.sequences=10", *layout)  # batches of 8: the second holds 2 windows
    validate(cfg)
    data = EvalBatches(cfg)
    assert data.steps == 2
    inputs, targets = _windows_of_step(data, 1, cfg.layout.dp)
    for row in range(2):
        window = torch.from_numpy(tokens[(8 + row) * S : (8 + row) * S + S + 1])
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])
    assert (targets[2:] == IGNORE_INDEX).all()
    for _, labels in (mb for d in range(cfg.layout.dp) for mb in data.microbatches(1, d)):
        assert (labels == IGNORE_INDEX).all() or (labels != IGNORE_INDEX).all(), "a microbatch is mixed"


def test_the_windows_past_eval_sequences_are_never_read(token_file):
    _, path = token_file
    data = EvalBatches(_cfg(path, "eval.sequences=8"))
    with pytest.raises(IndexError):
        data.windows.samples(4, 5)


@pytest.mark.parametrize("overrides, key", [
    (("train.eval_every=2", "data.eval_path=null"), "train.eval_every"),
    (("train.eval_every=-1",), "train.eval_every"),
    (("eval.sequences=0",), "eval.sequences"),
    (("eval.sequences=6", "train.micro_batch_size=4"), "eval.sequences"),  # not whole microbatches
    (("eval.sequences=128",), "eval.sequences"),  # 128 * 8 + 1 tokens > the file's 1000
])
def test_bad_eval_settings_are_refused_naming_the_key(token_file, overrides, key):
    _, path = token_file
    with pytest.raises(ValueError, match=rf"^{key}: "):
        validate(_cfg(path, "eval.sequences=16", *overrides))


def test_a_missing_eval_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^data.eval_path: .* is not a file"):
        validate(_cfg(str(tmp_path / "nope.bin")))


def test_vptrain_eval_without_an_eval_file_is_refused_before_anything_is_written(tmp_path):
    from vptrain.launch.entry import evaluate

    cfg = compose_cfg("logger=none")
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="^data.eval_path: "):
        evaluate(cfg)
    assert not (tmp_path / "run").exists()


def test_eval_loss_is_logged_beside_its_step_and_kept_by_a_resumed_run(tmp_path):
    cfg = compose_cfg("logger=none", "train.steps=3")
    cfg.run_dir = str(tmp_path)
    stages = [{"stage": 0, "busy_s": 0.1, "memory": {"params": 1}, "params": 1}]
    metrics = RunMetrics(cfg, is_logger=True, world_size=1)
    metrics.restore([])
    metrics.record(0, loss=5.0, lr=1e-3, grad_norm=1.0, iter_s=0.1, stages=stages)
    metrics.record(1, loss=4.0, lr=1e-3, grad_norm=1.0, iter_s=0.1, stages=stages, eval_loss=4.5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval/loss" not in rows[0] and rows[1]["eval/loss"] == 4.5 and rows[1]["train/loss"] == 4.0
    assert metrics.summary()["eval_losses"] == [[2, 4.5]] and metrics.summary()["final_eval_loss"] == 4.5
    resumed = RunMetrics(cfg, is_logger=True, world_size=1)
    resumed.restore([5.0, 4.0])  # resumed after step 2: the eval of step 2 stays in the summary
    assert resumed.summary()["eval_losses"] == [[2, 4.5]]
