"""The torch peer of benchmarks/cpu_methods.py (torch.distributed.pipelining's Schedule1F1B on
vptrain's GPT, benchmarks/_torch_peer.py) does the same work as vptrain: its step-1 loss equals the
single-process reference's for the same seed and data, and every stage trains.

Step 1's loss comes before any update, so only the forward enters it: the same transformer layers
on the same inputs, then the output layer, which the peer computes with the one-shard vocabulary
kernel and the reference with F.cross_entropy. Both work in fp32; the kernel's difference from the
exact value is bounded as in tests/unit/test_equal_kernels.py, (h + V + N)·eps relative for a
microbatch of N tokens (the logits' h-term dot products, the V-term softmax sum, the N-token mean),
and the mean over the microbatches is taken in fp64 on both sides.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.distributed

SHAPE = ("model.vocab_size=512", "model.hidden_size=64", "model.num_heads=2", "model.num_layers=2",
         "model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=1", "layout.pp=2")
COMMON = ("experiment=cpu-bench", "logger=none", "train.steps=1", *SHAPE)


def test_torch_peer_loss_equals_the_single_process_reference(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from _torch_peer import compose_config, run_peer

    from vptrain.data import StepData
    from vptrain.engine.single import SingleProcessTrainer

    peer = run_peer([*COMMON, "method=baseline"], tmp_path / "peer.json")

    cfg = compose_config([*COMMON, "method=baseline", "layout.pp=1"])
    reference = SingleProcessTrainer(cfg, device=torch.device("cpu"))
    want = reference.train_step(StepData(cfg).microbatches(0, 0)).loss

    eps = torch.finfo(torch.float32).eps
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    rtol = (cfg.model.hidden_size + cfg.model.vocab_size + tokens) * eps
    assert peer["losses"][0] == pytest.approx(want, rel=rtol, abs=0)
    assert peer["layers_per_stage"] == [1, 1]
    for stage in peer["stages"]:
        # Every parameter of every stage had a gradient at the optimizer step: AdamW keeps its two
        # moments (and a step count) only for those.
        memory = stage["memory_bytes"]
        assert memory["params"] > 0 and memory["optimizer"] >= 2 * memory["params"]
