"""A Hugging Face Llama imported into real `vptrain train` runs and exported back: each rank reads
only its own layers and vocabulary rows, import -> export is bitwise, and training from the same
import at pp=1 and at pp=2 x vocab-2 exports the same model, which transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_run
from safetensors.torch import load_file

from vptrain.hf.export import main as export_main

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")

V, LAYERS = 1001, 4
TABLES = ("model.embed_tokens.weight", "lm_head.weight")
# SGD, constant LR from step 1, small batches: three steps are seconds.
COMMON = ("logger=none", "optim=sgd", "optim.warmup_steps=0", "optim.decay=constant", "train.global_batch_size=4",
          "model.seq_len=32", "train.log_every=1")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> str:
    """A random LlamaForCausalLM saved sharded (several safetensors files + index)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(out, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 2
    return str(out)


def _tensors(directory: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reads(run_dir) -> dict[int, dict[str, list]]:
    """rank -> {tensor: [rows...]} from run_dir/init_from/rank_<r>.json."""
    out: dict[int, dict[str, list]] = {}
    for f in sorted((run_dir / "init_from").glob("rank_*.json")):
        record = json.loads(f.read_text())
        for name, rows in record["reads"]:
            out.setdefault(record["rank"], {}).setdefault(name, []).append(tuple(rows))
    return out


def test_import_export_without_learning_is_bitwise_and_each_rank_reads_its_part(tmp_path, hf_llama):
    # train.steps >= 1 and optim.lr > 0 are enforced, so "no step" is one SGD step of lr 1e-30:
    # |lr * g| < 1e-29 is far below half an ulp of any weight larger than 1e-20, so it rounds to a
    # bitwise no-op (HF's random weights hold no exact zeros; padding rows get no gradient).
    run = tmp_path / "run"
    train_run(run, f"model.init_from=hf:{hf_llama}", "layout.pp=2", "method=vocab-2", "train.steps=1",
              "optim.lr=1e-30", *COMMON)
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    original, exported = _tensors(hf_llama), _tensors(str(tmp_path / "out"))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert torch.equal(exported[name], value), name
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == V

    reads = _reads(run)
    assert sorted(reads) == [0, 1]
    for table in TABLES:  # the two shards tile [0, V) and neither rank read the whole table
        rows = sorted(r for rank in reads for r in reads[rank][table])
        assert len(rows) == 2 and rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == V
        assert all(len(reads[rank][table]) == 1 for rank in reads)
    layers = {rank: {n.split(".")[2] for n in reads[rank] if n.startswith("model.layers.")} for rank in reads}
    assert layers == {0: {"0", "1"}, 1: {"2", "3"}}, "each stage reads only its own layers"
    assert "model.norm.weight" in reads[1] and "model.norm.weight" not in reads[0]


def test_three_sgd_steps_export_the_same_model_at_pp1_and_pp2_vocab2(tmp_path, hf_llama):
    layouts = {"pp1": ("layout.pp=1", "method=baseline"), "pp2": ("layout.pp=2", "method=vocab-2")}
    losses = {}
    for name, layout in layouts.items():
        summary = train_run(tmp_path / name, f"model.init_from=hf:{hf_llama}", *layout, "train.steps=3",
                            "optim.lr=0.5", *COMMON)
        losses[name] = summary["losses"]
        assert export_main([str(tmp_path / name), str(tmp_path / f"{name}-hf")]) == 0
    assert losses["pp1"] == pytest.approx(losses["pp2"], rel=1e-5)
    a, b = _tensors(str(tmp_path / "pp1-hf")), _tensors(str(tmp_path / "pp2-hf"))
    original = _tensors(hf_llama)
    assert sorted(a) == sorted(b) == sorted(original)
    moved = max((a[n] - original[n]).abs().max().item() for n in a)
    assert moved > 1e-3, "three steps must have changed the weights for the comparison to mean anything"
    for n in a:  # fp32, the same sums in another order: rounding ~1e-7 relative, three steps
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = [transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"{n}-hf").eval()(ids).logits
                  for n in layouts]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_bf16_pipeline_masters_start_from_the_import(tmp_path, hf_llama):
    """precision=bf16: DeepSpeed's fp32 master weights hold the checkpoint's fp32 values, not their
    bf16 rounding (vptrain.init_from.restore_fp32_masters), with dp=2 partitioning the masters."""
    run = tmp_path / "run"
    train_run(run, f"model.init_from=hf:{hf_llama}", "layout.pp=2", "layout.dp=2", "method=vocab-2",
              "precision=bf16", "train.steps=1", "optim.lr=1e-30", *COMMON)
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    original, exported = _tensors(hf_llama), _tensors(str(tmp_path / "out"))
    for name, value in original.items():
        assert torch.equal(exported[name], value), name
