"""The real engines' passes, checked one pass at a time (see _pass_checks.py).

* No host sync (DESIGN.md invariant 6): one step of each configuration with the engine's F, B, W, S,
  T, IF, IB and vocabulary-collective handlers (the loss and g inside them) run under
  vptrain.host_sync.forbid_host_sync, which raises on any operation that would make a GPU's host
  wait. The layer-level counterparts are in tests/unit/test_sync_free.py.
* bf16: each vocabulary shard's gradient goes straight into BF16_Optimizer's gradient buffer.

One group of 2 gloo processes runs every configuration.
"""

from __future__ import annotations

import math

import pytest
from _pass_checks import CASES, SPLIT, worker
from _spawn import run_ranks

pytestmark = pytest.mark.distributed

VOCAB_PASSES = {"ForwardPass", "BackwardPass", "InputForward", "InputBackward", "OutputForward", "OutputBackward",
                "VocabCollective"}
BF16_CASES = [c for c in CASES if c["overrides"].get("precision") == "bf16"]


@pytest.fixture(scope="module")
def steps() -> list[dict]:
    return run_ranks(worker, 2, timeout_s=60)


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_engine_passes_run_without_host_sync(steps, spec) -> None:
    for rank, results in enumerate(steps):
        result = results[spec["name"]]
        assert not result["error"], f"rank {rank}:\n{result['error']}"
        assert math.isfinite(result["loss"])
        # The guard really wrapped the passes this method runs (a vacuous check would run none).
        expected = VOCAB_PASSES if spec["overrides"]["method.name"] != "baseline" else {"ForwardPass", "BackwardPass"}
        if spec["overrides"].get("schedule.name") in SPLIT:
            expected = expected | {"WeightPass"}
        assert set(result["ran"]) == expected, f"rank {rank} ran {sorted(set(result['ran']))} under the guard"
    assert steps[0][spec["name"]]["loss"] == steps[1][spec["name"]]["loss"]


@pytest.mark.parametrize("spec", BF16_CASES, ids=[c["name"] for c in BF16_CASES])
def test_bf16_shard_gradients_go_straight_into_the_optimizers_gradients(steps, spec) -> None:
    """BF16_Optimizer's gradient of each shard equals the fp64 sum of the fp32 gradients T and IB
    produced, to the rounding of summing them in that buffer's dtype (terms * eps * Σ|g|): nothing
    lost to clear_lp_grads, nothing added twice, no .grad left for autograd, and the norm sees the
    shard (has_grad)."""
    tied = spec["overrides"].get("model.tie_embeddings", False)
    m = spec["overrides"]["train.global_batch_size"]
    for rank, results in enumerate(steps):
        result = results[spec["name"]]
        assert not result["error"], f"rank {rank}:\n{result['error']}"
        shards = result["bf16_shards"]
        assert len(shards) == (1 if tied else 2)
        for shard in shards:
            assert shard["terms"] == (2 * m if tied else m)  # one T (and one IB) per microbatch
            assert shard["nonzero"] and shard["has_grad"] and shard["lp_grad_is_none"], shard
            assert shard["ratio"] <= 1.0, f"rank {rank}: {shard['hp_dtype']} gradient off by {shard['ratio']:.2f}x"
