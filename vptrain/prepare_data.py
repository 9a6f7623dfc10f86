"""`vptrain prepare-data`: a tokenizer (trained, or one you have) and token shards to train on.

    vptrain prepare-data --input corpus/ --vocab-size 65536 --out data/bpe64k
    vptrain prepare-data --input docs/*.jsonl --tokenizer llama3/tokenizer.json --out data/llama3

trains a byte-level BPE tokenizer (Hugging Face `tokenizers`) on local files, or takes an existing
tokenizer.json, encodes the files and writes, into --out:

    tokenizer.json     the tokenizer (a given one is copied here, so runs and export-hf find it)
    train_0000.bin ... flat token shards (uint16 when the vocabulary fits in 65536 ids, else uint32),
                       the memmap format `data=memmap` reads; documents end with an end-of-text token
    meta.json          vocabulary sizes, dtype, token counts, the inputs, and the train overrides to use;
                       `vptrain train` reads it before launch (vptrain/data_meta.py)

Inputs: *.txt (one file a document), json / jsonl / parquet (one row a document, text in
--text-field) through `datasets` (vptrain/prepare_sources.py). One directory per vocabulary size
lets a sweep over 32k...256k vocabularies train on the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vptrain.prepare_sources import TEXT, Batch, Source, input_files, load_sources

EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
"""End-of-text tokens of common tokenizers (GPT-2 / Qwen, Llama 3, Llama 2 / Mistral, Gemma), tried in order."""
UINT16_LIMIT = 65536
SHARD_NAME = re.compile(r"train_\d{4}\.bin")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_LIMIT else "uint32"


@dataclass
class Phases:
    """Wall seconds per phase, printed at the end and kept in meta.json."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("load", "train tokenizer", "encode", "write"), 0.0))

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file or a test's captured stderr.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None)


def _texts(sources: list[Source], desc: str) -> Iterator[str]:
    with _progress(sum(s.total_bytes() for s in sources), desc) as bar:
        for source in sources:
            for batch in source.batches():
                yield from batch.texts
                bar.update(batch.nbytes)


def train_tokenizer(sources: list[Source], vocab_size: int, min_frequency: int = 2, eot: str = EOT):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte has a token, so any text encodes without an unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eot],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(sources, "train tokenizer"), trainer=trainer)
    return tok


def load_tokenizer(path: Path):
    """A Hugging Face `tokenizers` file, or a model directory holding tokenizer.json."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--tokenizer: {file} does not exist")
    try:
        return Tokenizer.from_file(str(file)), file
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise ValueError(f"--tokenizer: {file} is not a Hugging Face tokenizers file ({err})") from None


def tokenizer_ids(tok) -> int:
    """How many ids the tokenizer can emit (highest id + 1, added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def end_of_text(tok, name: str | None) -> tuple[str, int]:
    vocab = tok.get_vocab(with_added_tokens=True)
    names = (name,) if name else EOT_NAMES
    for candidate in names:
        if candidate in vocab:
            return candidate, vocab[candidate]
    if name:
        raise ValueError(f"--eot-token: '{name}' is not in the tokenizer's vocabulary")
    raise ValueError(f"--eot-token: the tokenizer has none of {', '.join(EOT_NAMES)}; name its end-of-text token")


class ShardWriter:
    """Buffers token ids and writes fixed-size shards of flat tokens (vptrain.data's memmap format)."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []
        self.total = 0
        self.max_id = -1
        self.write_seconds = 0.0

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self.max_id = max(self.max_id, int(ids.max()))
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
        start = time.perf_counter()
        name = f"train_{len(self.shards):04d}.bin"
        # The format of vptrain.data.write_token_file, written here without importing torch.
        tmp = self.out / f"{name}.tmp"
        ids.astype(np.dtype(self.dtype), copy=False).tofile(tmp)
        os.replace(tmp, self.out / name)
        self.shards.append(name)
        self.shard_sizes.append(len(ids))
        self.write_seconds += time.perf_counter() - start


def encode_sources(tok, sources: list[Source], writer: ShardWriter, eot: int) -> int:
    """Every document's tokens, then the end-of-text id; returns the number of documents."""
    documents = 0
    with _progress(sum(s.total_bytes() for s in sources), "encode") as bar:
        for source in sources:
            for batch in source.batches():
                writer.add(_encode(tok, batch, eot, writer.dtype))
                documents += sum(batch.ends)
                bar.update(batch.nbytes)
    return documents


def _encode(tok, batch: Batch, eot: int, dtype: str) -> np.ndarray:
    ids: list[int] = []
    for encoding, ends in zip(tok.encode_batch(batch.texts, add_special_tokens=False), batch.ends, strict=True):
        ids += encoding.ids
        if ends:
            ids.append(eot)
    return np.asarray(ids, dtype=np.dtype(dtype))


@dataclass(frozen=True)
class PrepareOptions:
    pattern: str | None = None
    """Directories' files to read (default: *.txt, *.json, *.jsonl, *.parquet, ...)."""
    shard_tokens: int = 1 << 26
    min_frequency: int = 2
    tokenizer: Path | None = None
    """An existing tokenizer.json (or a directory holding one) instead of training one."""
    text_field: str = "text"
    eot_token: str | None = None


def prepare(inputs: list[str], vocab_size: int | None, out: Path, options: PrepareOptions = PrepareOptions()) -> dict:
    o, phases = options, Phases()
    start = clock = time.perf_counter()
    files = input_files(inputs, (o.pattern,) if o.pattern else None, exclude=out)
    given = None
    if o.tokenizer is not None:  # checked before the (slower) inputs are loaded
        tok, given = load_tokenizer(o.tokenizer)
        ids = tokenizer_ids(tok)
        vocab_size = vocab_size or ids
        if vocab_size < ids:
            raise ValueError(f"--vocab-size: {vocab_size} is smaller than the {ids} ids of {given}; "
                             f"leave it out or give at least {ids}")
        eot_name, eot = end_of_text(tok, o.eot_token)
    elif vocab_size is None:
        raise ValueError("--vocab-size: required when training a tokenizer (or pass --tokenizer FILE)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a half-rewritten directory has no meta to trust
    with tempfile.TemporaryDirectory(dir=out, prefix=".datasets-cache-") as cache:
        sources = load_sources(files, o.text_field, Path(cache))
        clock = phases.add("load", clock)
        if given is not None:
            _copy_tokenizer(given, out)
        else:
            tok = train_tokenizer(sources, vocab_size, o.min_frequency, eot=o.eot_token or EOT)
            tok.save(str(out / "tokenizer.json"))
            ids = tokenizer_ids(tok)
            eot_name, eot = end_of_text(tok, o.eot_token or EOT)
            clock = phases.add("train tokenizer", clock)
        dtype = token_dtype(vocab_size)
        writer = ShardWriter(out, dtype, o.shard_tokens)
        documents = encode_sources(tok, sources, writer, eot)
        writer.close()
    if not writer.total:
        raise ValueError(f"--input: no text in {', '.join(inputs)} (every row's --text-field '{o.text_field}' is null)")
    phases.add("encode", clock)
    phases.seconds["encode"] -= writer.write_seconds
    phases.seconds["write"] = writer.write_seconds
    _remove_stale_shards(out, writer.shards)
    meta = {
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": ids,
        "dtype": dtype,
        "num_tokens": writer.total,
        "max_token_id": writer.max_id,
        "shards": writer.shards,
        "shard_tokens": writer.shard_sizes,
        "documents": documents,
        "eot_id": eot,
        "eot_token": eot_name,
        "tokenizer": "tokenizer.json",
        "tokenizer_source": str(given.resolve()) if given is not None else "trained",
        "inputs": [str(f) for f in files],
        "text_field": o.text_field if any(s.kind != TEXT for s in sources) else None,
        "phases": {name: round(s, 3) for name, s in phases.seconds.items()},
        "seconds": round(time.perf_counter() - start, 2),
        "train_overrides": ["data=memmap", f"data.path={out.resolve()}", f"data.dtype={dtype}",
                            f"model.vocab_size={vocab_size}"],
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def _copy_tokenizer(given: Path, out: Path) -> None:
    """tokenizer.json, and the transformers files beside it (so export-hf can ship a loadable tokenizer)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = given if name == "tokenizer.json" else given.parent / name
        target = out / name
        if source.is_file() and not (target.exists() and os.path.samefile(source, target)):
            shutil.copyfile(source, target)


def _remove_stale_shards(out: Path, written: list[str]) -> None:
    """Shards of an earlier, longer run into the same directory would otherwise be read as data."""
    keep = set(written)
    for f in out.iterdir():
        if SHARD_NAME.fullmatch(f.name) and f.name not in keep:
            f.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vptrain prepare-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help="files (.txt, .json, .jsonl, .parquet) and/or directories of them")
    ap.add_argument("--vocab-size", type=int, help="BPE vocabulary size (incl. <|endoftext|>); with --tokenizer: "
                                                   "model.vocab_size to train with (default: the tokenizer's ids)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--tokenizer", type=Path, help="an existing Hugging Face tokenizer.json (or a directory "
                                                   "holding one) instead of training a tokenizer")
    ap.add_argument("--text-field", default="text", help="json / jsonl / parquet: the column of text (default text)")
    ap.add_argument("--eot-token", help=f"the end-of-text token after each document (default: {EOT} when training, "
                                        f"else the first of {' '.join(EOT_NAMES)} in the vocabulary)")
    ap.add_argument("--pattern", help="file pattern inside input directories (default: every kind it reads)")
    ap.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per .bin shard (default 2^26)")
    ap.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    args = ap.parse_args(argv)
    if args.tokenizer is None and args.vocab_size is not None and args.vocab_size < 257:
        return _usage_error("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    if args.shard_tokens < 1:
        return _usage_error("--shard-tokens must be >= 1")
    # `datasets` reads these on import: the local json / parquet builders need nothing from the Hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = PrepareOptions(pattern=args.pattern, shard_tokens=args.shard_tokens, min_frequency=args.min_frequency,
                             tokenizer=args.tokenizer, text_field=args.text_field, eot_token=args.eot_token)
    try:
        meta = prepare(args.input, args.vocab_size, args.out, options)
    except (FileNotFoundError, ValueError) as err:
        return _usage_error(str(err))
    ids, vocab = meta["tokenizer_vocab_size"], meta["vocab_size"]
    note = "" if ids == vocab else f" (the tokenizer emits {ids} ids; ids stay below that)"
    print(f"vptrain: {meta['num_tokens']:,} tokens from {meta['documents']:,} documents in {len(meta['shards'])} "
          f"shard(s), {meta['dtype']}, vocabulary {vocab}{note}, {meta['seconds']} s -> {args.out}")
    print("phases: " + " · ".join(f"{name} {s:.2f} s" for name, s in meta["phases"].items()))
    print("train on it with:  vptrain train " + " ".join(meta["train_overrides"]))
    return 0


def _usage_error(message: str) -> int:
    print(f"vptrain prepare-data: {message}", file=sys.stderr)
    return 2
