"""vocab.chunk_tokens: the user's value, or, left unset, a chunk the plan picks from the device memory.

The plan and the trainer both call vptrain.plan.chunk_tokens_of, so `vptrain plan` shows what runs.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vptrain.config import RunConfig
from vptrain.layout import model_shape
from vptrain.plan import GIB, chunk_tokens_of, make_plan, plan_dict
from vptrain.schedule.costs import CHUNK_MULTIPLE, CHUNK_TRANSIENT_SHARE
from vptrain.validate import validate

# The paper's 4B model at pp=2 with V=256k and 8 sequences per microbatch: 16384 tokens x 128k rows.
LARGE = {"model.num_layers": 32, "model.hidden_size": 3072, "model.num_heads": 24, "model.seq_len": 2048,
         "model.vocab_size": 262144, "layout.pp": 2, "train.micro_batch_size": 8, "train.global_batch_size": 16,
         "precision": "bf16", "cluster.gpu_memory_gb": 80}


def _cfg(**overrides) -> RunConfig:
    dotlist = [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(dotlist), {"run_dir": "x"})
    return OmegaConf.to_object(merged)


def test_unset_by_default_and_validated() -> None:
    assert RunConfig().vocab.chunk_tokens is None
    validate(_cfg())
    with pytest.raises(ValueError, match="vocab.chunk_tokens"):
        validate(_cfg(**{"vocab.chunk_tokens": -1}))


@pytest.mark.parametrize("value", [0, 7, 4096])
def test_a_value_the_user_sets_is_used_as_it_is(value: int) -> None:
    assert chunk_tokens_of(_cfg(**LARGE, **{"vocab.chunk_tokens": value})) == value


def test_a_small_model_runs_in_one_chunk() -> None:
    assert chunk_tokens_of(_cfg()) == 0


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_large_microbatch_gets_the_largest_chunk_that_fits_the_budget(precision: str) -> None:
    cfg = _cfg(**{**LARGE, "precision": precision})
    chunk = chunk_tokens_of(cfg)
    shape = model_shape(cfg)
    rows = shape.vocab_rows // cfg.layout.pp
    per_token = rows * (6 if precision == "bf16" else 4)  # fp32 logits (+ their bf16 GEMM copy)
    budget = CHUNK_TRANSIENT_SHARE * cfg.cluster.gpu_memory_gb * GIB
    assert 0 < chunk < shape.tokens and chunk % CHUNK_MULTIPLE == 0
    assert chunk * per_token <= budget < (chunk + CHUNK_MULTIPLE) * per_token
    smaller = chunk_tokens_of(_cfg(**{**LARGE, "precision": precision, "cluster.gpu_memory_gb": 40}))
    assert smaller < chunk  # half the memory, a smaller chunk


def test_the_plan_reports_the_chunk_the_trainer_uses() -> None:
    cfg = _cfg(**{**LARGE, "model.num_layers": 4})
    summary = plan_dict(make_plan(cfg))["config"]
    assert summary["chunk_tokens"] == chunk_tokens_of(cfg) > 0
    assert summary["chunk_tokens_chosen"] is True
