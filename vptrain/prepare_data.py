"""`vptrain prepare-data`: a BPE tokenizer of a chosen vocabulary size, and token shards to train on.

    vptrain prepare-data --input corpus/ --vocab-size 65536 --out data/bpe64k

trains a byte-level BPE tokenizer (Hugging Face `tokenizers`) on local text files, encodes them
and writes, into --out:

    tokenizer.json     the tokenizer
    train_0000.bin ... flat token shards (uint16 when the vocabulary fits in 65536 ids, else uint32),
                       the memmap format `data=memmap` reads; documents are separated by <|endoftext|>
    meta.json          vocabulary size, dtype, token counts, the inputs, and the train overrides to use

One directory per vocabulary size lets a sweep over 32k...256k vocabularies train on the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
UINT16_LIMIT = 65536
LINES_PER_BATCH = 2048


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_LIMIT else "uint32"


def input_files(paths: list[str], pattern: str) -> list[Path]:
    """Files as given; directories contribute their files matching `pattern`, recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--input: {p} does not exist")
    if not found:
        raise FileNotFoundError(f"--input: no files matching '{pattern}' in {', '.join(paths)}")
    return found


def _lines(files: list[Path]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield from fh


def train_tokenizer(files: list[Path], vocab_size: int, min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte has a token, so any text encodes without an unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(files), trainer=trainer)
    return tok


class ShardWriter:
    """Buffers token ids and writes fixed-size shards with vptrain.data.write_token_file."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[str] = []
        self.total = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_len += len(ids)
        self.total += len(ids)
        while self.pending_len >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.pending_len:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_len = [], 0

    def _write(self, ids: np.ndarray) -> None:
        from vptrain.data import write_token_file

        name = f"train_{len(self.shards):04d}.bin"
        write_token_file(str(self.out / name), ids, self.dtype)
        self.shards.append(name)


def encode_files(tok, files: list[Path], writer: ShardWriter) -> None:
    """Each input file is one document, followed by <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    dtype = np.dtype(writer.dtype)
    for f in files:
        batch: list[str] = []
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                batch.append(line)
                if len(batch) == LINES_PER_BATCH:
                    _encode_batch(tok, batch, writer, dtype)
                    batch = []
        _encode_batch(tok, batch, writer, dtype)
        writer.add(np.array([eot], dtype=dtype))


def _encode_batch(tok, batch: list[str], writer: ShardWriter, dtype: np.dtype) -> None:
    if not batch:
        return
    encoded = tok.encode_batch(batch, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encoded if e.ids]
    if ids:
        writer.add(np.concatenate(ids))


def prepare(inputs: list[str], vocab_size: int, out: Path, *, pattern: str = "*.txt",
            shard_tokens: int = 1 << 26, min_frequency: int = 2) -> dict:
    files = input_files(inputs, pattern)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tok = train_tokenizer(files, vocab_size, min_frequency)
    tok.save(str(out / "tokenizer.json"))
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(out, dtype, shard_tokens)
    encode_files(tok, files, writer)
    writer.close()
    learned = tok.get_vocab_size()
    meta = {
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": learned,
        "dtype": dtype,
        "num_tokens": writer.total,
        "shards": writer.shards,
        "eot_id": tok.token_to_id(EOT),
        "inputs": [str(f) for f in files],
        "seconds": round(time.perf_counter() - start, 2),
        "train_overrides": ["data=memmap", f"data.path={out.resolve()}", f"data.dtype={dtype}",
                            f"model.vocab_size={vocab_size}"],
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vptrain prepare-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="text files and/or directories of them")
    ap.add_argument("--vocab-size", type=int, required=True, help="BPE vocabulary size (incl. <|endoftext|>)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--pattern", default="*.txt", help="file pattern inside input directories (default *.txt)")
    ap.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per .bin shard (default 2^26)")
    ap.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    args = ap.parse_args(argv)
    if args.vocab_size < 257:
        print("vptrain prepare-data: --vocab-size must be at least 257 (256 bytes + <|endoftext|>)", file=sys.stderr)
        return 2
    if args.shard_tokens < 1:
        print("vptrain prepare-data: --shard-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        meta = prepare(args.input, args.vocab_size, args.out, pattern=args.pattern, shard_tokens=args.shard_tokens,
                       min_frequency=args.min_frequency)
    except FileNotFoundError as err:
        print(f"vptrain prepare-data: {err}", file=sys.stderr)
        return 2
    learned = meta["tokenizer_vocab_size"]
    note = "" if learned == args.vocab_size else f" (the text supports {learned} tokens; ids stay below that)"
    print(f"vptrain: {meta['num_tokens']:,} tokens in {len(meta['shards'])} shard(s), {meta['dtype']}, "
          f"vocabulary {args.vocab_size}{note}, {meta['seconds']} s -> {args.out}")
    print("train on it with:  vptrain train " + " ".join(meta["train_overrides"]))
    return 0
