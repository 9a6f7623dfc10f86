"""`vptrain prepare-data`: a BPE tokenizer and memmap shards from local text, then training on them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, train_run

from vptrain.prepare_data import token_dtype


def write_corpus(root: Path, files: int = 3, lines: int = 1500) -> Path:
    """A few hundred KB of text with a word distribution BPE can learn."""
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    root.mkdir(parents=True)
    for i in range(files):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(lines))
        (root / f"doc{i}.txt").write_text(text + "\n")
    return root


def test_dtype_follows_the_vocabulary_size():
    assert token_dtype(32768) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


@pytest.mark.distributed
def test_prepare_data_then_train_on_it(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    out = tmp_path / "bpe1k"
    proc = run_cli("prepare-data", "--input", str(corpus), "--vocab-size", "1024", "--out", str(out),
                   "--shard-tokens", "100000", timeout=300, check=True)
    assert "train on it with:" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_vocab_size"] == 1024 and len(meta["shards"]) >= 2
    tokens = np.concatenate([np.fromfile(out / s, dtype=np.uint16) for s in meta["shards"]])
    assert len(tokens) == meta["num_tokens"] and tokens.max() < 1024
    assert (tokens == meta["eot_id"]).sum() == 3, "one <|endoftext|> after each document"

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    first_doc = tokens[: int(np.argmax(tokens == meta["eot_id"]))]
    assert tok.decode(first_doc.tolist()) == (corpus / "doc0.txt").read_text(), "tokens decode back to the text"

    summary = train_run(tmp_path / "run", *meta["train_overrides"], "method=baseline", "layout.pp=2", "train.steps=3",
                        "model.seq_len=32", "logger=none")
    assert summary["steps"] == 3 and all(np.isfinite(summary["losses"]))


def test_large_vocabularies_use_uint32_shards(tmp_path):
    corpus = write_corpus(tmp_path / "text", files=1, lines=400)
    out = tmp_path / "bpe70k"
    run_cli("prepare-data", "--input", str(corpus / "doc0.txt"), "--vocab-size", "70000", "--out", str(out),
            timeout=300, check=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and "data.dtype=uint32" in meta["train_overrides"]
    assert (out / meta["shards"][0]).stat().st_size == 4 * meta["num_tokens"]


def test_missing_input_is_a_clear_error(tmp_path):
    proc = run_cli("prepare-data", "--input", str(tmp_path / "nope"), "--vocab-size", "1024", "--out",
                   str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
