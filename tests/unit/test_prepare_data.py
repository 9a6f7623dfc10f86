"""`vptrain prepare-data`: a tokenizer (trained, or given) and memmap shards from local text, jsonl,
json and parquet files, then training on them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, run_cli, train_run

from vptrain.prepare_data import PrepareOptions, main, prepare, token_dtype

WORDS = [f"w{i}" for i in range(40)] + ["héllo", "naïve", "日本"]


def write_corpus(root: Path, files: int = 3, lines: int = 1500) -> Path:
    """A few hundred KB of text with a word distribution BPE can learn."""
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    root.mkdir(parents=True)
    for i in range(files):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(lines))
        (root / f"doc{i}.txt").write_text(text + "\n")
    return root


def word_tokenizer(path: Path, eot: str = "</s>") -> Path:
    """A tiny Hugging Face tokenizer.json: one id per word of WORDS, an unknown token and `eot`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, eot: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS + ["unknown"]) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def expected_tokens(tokenizer: Path, docs: list[str], eot: int = 1) -> np.ndarray:
    """What prepare-data must write: each document's ids, then the end-of-text id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    return np.array([i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids, eot]])


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return path


def shard_tokens(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / s, dtype=meta["dtype"]) for s in meta["shards"]])


def test_dtype_follows_the_vocabulary_size():
    assert token_dtype(32768) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_text_files_train_a_tokenizer_and_decode_back(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    out = tmp_path / "bpe1k"
    proc = run_cli("prepare-data", "--input", str(corpus), "--vocab-size", "1024", "--out", str(out),
                   "--shard-tokens", "100000", timeout=300, check=True)
    assert "train on it with:" in proc.stdout
    phases = next(line for line in proc.stdout.splitlines() if line.startswith("phases:"))
    assert all(name in phases for name in ("load", "train tokenizer", "encode", "write")), phases
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_vocab_size"] == 1024 and len(meta["shards"]) >= 2
    assert meta["tokenizer_source"] == "trained" and meta["text_field"] is None and meta["documents"] == 3
    tokens = shard_tokens(out)
    assert len(tokens) == meta["num_tokens"] == sum(meta["shard_tokens"]) and tokens.max() == meta["max_token_id"]
    assert meta["max_token_id"] < 1024
    assert (tokens == meta["eot_id"]).sum() == 3, "one <|endoftext|> after each document"

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    first_doc = tokens[: int(np.argmax(tokens == meta["eot_id"]))]
    assert tok.decode(first_doc.tolist()) == (corpus / "doc0.txt").read_text(), "tokens decode back to the text"


@pytest.mark.distributed
def test_jsonl_with_a_given_tokenizer_then_train_on_it(tmp_path):
    docs = documents()
    tokenizer = word_tokenizer(tmp_path / "given.json")
    data = write_jsonl(tmp_path / "corpus.jsonl", docs, field="body")
    out, home = tmp_path / "prepared", tmp_path / "home"
    env = cli_env(HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "cache"))
    proc = run_cli("prepare-data", "--input", str(data), "--tokenizer", str(tokenizer), "--text-field", "body",
                   "--out", str(out), env=env, timeout=300, check=True)
    assert "phases: load" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    np.testing.assert_array_equal(shard_tokens(out), expected_tokens(tokenizer, docs))
    ids = len(WORDS) + 2
    assert (meta["vocab_size"], meta["tokenizer_vocab_size"], meta["dtype"]) == (ids, ids, "uint16")
    assert (meta["eot_token"], meta["eot_id"], meta["documents"], meta["text_field"]) == ("</s>", 1, len(docs), "body")
    assert meta["inputs"] == [str(data)] and meta["tokenizer"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes(), "the given tokenizer is copied"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train_0000.bin"], \
        "no datasets cache left behind"
    assert not home.exists(), "datasets wrote under the home directory"

    summary = train_run(tmp_path / "run", *meta["train_overrides"], "method=baseline", "layout.pp=1", "train.steps=2",
                        "model.seq_len=32", "logger=none")
    assert summary["steps"] == 2 and len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))


def test_parquet_and_json_give_the_tokens_jsonl_gives_and_text_files_mix_in(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(200, seed=1)
    tokenizer = word_tokenizer(tmp_path / "given.json")
    options = PrepareOptions(tokenizer=tokenizer, shard_tokens=500)
    want = expected_tokens(tokenizer, docs)
    pq.write_table(pa.table({"text": docs[:150] + [None] + docs[150:]}), tmp_path / "corpus.parquet")  # null: no doc
    (tmp_path / "corpus.json").write_text(json.dumps([{"text": d} for d in docs]))  # one JSON array
    for source in ("corpus.parquet", "corpus.json"):
        out = tmp_path / source.replace(".", "_")
        meta = prepare([str(tmp_path / source)], None, out, options)
        np.testing.assert_array_equal(shard_tokens(out), want, err_msg=source)
        assert meta["documents"] == len(docs) and len(meta["shards"]) == -(-len(want) // 500)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", docs[:10])
    (mixed / "b.txt").write_text("w1 w2\nw3\n")
    meta = prepare([str(mixed)], None, mixed / "out", options)
    np.testing.assert_array_equal(shard_tokens(mixed / "out"), np.concatenate(
        [expected_tokens(tokenizer, docs[:10]), expected_tokens(tokenizer, ["w1 w2\nw3\n"])]))
    assert meta["documents"] == 11
    meta = prepare([str(mixed)], None, mixed / "out", options)  # again: its own output is not an input
    assert meta["inputs"] == [str(mixed / "a.jsonl"), str(mixed / "b.txt")]


def test_fewer_shards_on_a_rerun_remove_the_stale_ones(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "given.json")
    text = tmp_path / "a.txt"
    text.write_text(" ".join(WORDS) + "\n")
    out = tmp_path / "out"
    assert len(prepare([str(text)], None, out, PrepareOptions(tokenizer=tokenizer, shard_tokens=10))["shards"]) > 1
    meta = prepare([str(text)], None, out, PrepareOptions(tokenizer=tokenizer))
    assert sorted(p.name for p in out.glob("*.bin")) == meta["shards"] == ["train_0000.bin"]


def _main(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_bad_text_field_or_vocab_size_is_one_line_exit_2(tmp_path, capsys):
    tokenizer = word_tokenizer(tmp_path / "given.json")
    data = write_jsonl(tmp_path / "c.jsonl", documents(5), field="body")
    out = str(tmp_path / "o")
    code, lines = _main(capsys, "--input", str(data), "--tokenizer", str(tokenizer), "--out", out)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("vptrain prepare-data: --text-field: 'text' is not"), lines
    assert "columns: id, body" in lines[0]
    code, lines = _main(capsys, "--input", str(data), "--tokenizer", str(tokenizer), "--out", out, "--text-field", "id")
    assert code == 2 and lines[0].startswith("vptrain prepare-data: --text-field: column 'id'"), lines
    code, lines = _main(capsys, "--input", str(data), "--tokenizer", str(tokenizer), "--out", out, "--text-field",
                        "body", "--vocab-size", "10")
    assert code == 2 and lines[0].startswith("vptrain prepare-data: --vocab-size: 10 is smaller than the 45 ids"), lines
    code, lines = _main(capsys, "--input", str(data), "--tokenizer", str(word_tokenizer(tmp_path / "t2.json", "<x>")),
                        "--out", out, "--text-field", "body")
    assert code == 2 and lines[0].startswith("vptrain prepare-data: --eot-token: the tokenizer has none of"), lines
    code, lines = _main(capsys, "--input", str(tmp_path / "nope"), "--vocab-size", "1024", "--out", out)
    assert code == 2 and "does not exist" in lines[0]


def test_large_vocabularies_use_uint32_shards(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "text", files=1, lines=400)
    out = tmp_path / "bpe70k"
    assert main(["--input", str(corpus / "doc0.txt"), "--vocab-size", "70000", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and "data.dtype=uint32" in meta["train_overrides"]
    assert (out / meta["shards"][0]).stat().st_size == 4 * meta["num_tokens"]
