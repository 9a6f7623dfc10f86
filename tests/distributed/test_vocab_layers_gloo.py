"""Vocabulary-parallel layers on 2, 3 and 4 real gloo processes equal the unsharded PyTorch layers.

One group of 4 processes is spawned for the whole module (start-up dominates); the cases run in
sub-groups of 2, 3 and 4 ranks (see _vocab_cases.py) and each test below asserts on its share of
the collected results. fp32 tolerance rtol 1e-5 (atol 1e-6 for entries that cancel to ~0); bf16
tolerance 2e-2 relative to the largest gradient entry, against fp32 math on the bf16-rounded inputs.
"""

from __future__ import annotations

import pytest
from _spawn import run_ranks
from _vocab_cases import (
    EXPECTED_BARRIERS,
    EXPECTED_COLLECTIVES,
    OPTIONS,
    OUTPUT_CASES,
    PIPELINED_ALGOS,
    SIZES,
    WORLD,
    worker,
)

from vptrain.vocab import ALGOS

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def gloo() -> dict:
    """{"failures": case key -> mismatch messages of all ranks, "counts": rank -> per-algo counts}."""
    per_rank = run_ranks(worker, WORLD)
    failures: dict[str, list[str]] = {}
    for rank, result in enumerate(per_rank):
        for key, messages in result["failures"].items():
            failures.setdefault(key, []).extend(f"rank {rank}: {m}" for m in messages)
    return {"failures": failures, "counts": [r["counts"] for r in per_rank]}


def _assert_cases(gloo: dict, prefix: str, expected_keys: int) -> None:
    keys = [k for k in gloo["failures"] if k.startswith(prefix)]
    assert len(keys) == expected_keys, f"{prefix}: {len(keys)} cases ran, expected {expected_keys}"
    messages = [m for k in keys for m in gloo["failures"][k]]
    assert not messages, "\n".join(messages[:8])


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", OUTPUT_CASES)
@pytest.mark.parametrize("p", SIZES)
def test_output_layer_equals_cross_entropy(gloo: dict, p: int, case: str, algo: str) -> None:
    """Loss, ∇X and every shard's ∇W, for every chunk_tokens/store_softmax option, sync and async."""
    _assert_cases(gloo, f"p{p}/{case}/{algo}/", len(OPTIONS))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", SIZES)
def test_output_layer_in_bf16(gloo: dict, p: int, algo: str) -> None:
    _assert_cases(gloo, f"p{p}/bf16/{algo}/", 2)


@pytest.mark.parametrize("p", SIZES)
def test_input_layer_equals_embedding(gloo: dict, p: int) -> None:
    """IF + all-reduce or reduce-to-one-rank, IB after a broadcast from the owning rank."""
    _assert_cases(gloo, f"p{p}/input/", 2)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", SIZES)
def test_tied_embeddings_accumulate_both_gradients(gloo: dict, p: int, algo: str) -> None:
    _assert_cases(gloo, f"p{p}/tied/{algo}", 1)


@pytest.mark.parametrize("algo", PIPELINED_ALGOS)
@pytest.mark.parametrize("p", SIZES)
def test_microbatches_in_flight_with_async_phases(gloo: dict, p: int, algo: str) -> None:
    """S_i and its async phase run before T_{i-1}; one microbatch fully masked."""
    _assert_cases(gloo, f"p{p}/pipelined/{algo}", 1)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", SIZES)
def test_collectives_and_barriers_per_microbatch(gloo: dict, p: int, algo: str) -> None:
    """naive 3 barriers, alg1 2, alg2 1 (its ∇X̂ all-reduce is chained inside the first)."""
    for rank in range(p):
        counts = gloo["counts"][rank][f"p{p}/{algo}"]
        assert counts["collectives"] == EXPECTED_COLLECTIVES[algo], f"rank {rank}"
        assert counts["barriers"] == EXPECTED_BARRIERS[algo], f"rank {rank}: {counts}"
