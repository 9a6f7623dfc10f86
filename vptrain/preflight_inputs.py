"""Pre-launch checks of the token files a run reads (data.path, data.eval_path) against the model
and the meta.json prepare-data wrote beside them. Each raises ValueError naming the key
(vptrain/preflight.py runs them; the checkpoint to resume is vptrain/preflight_resume.py's)."""

from __future__ import annotations

import os

import numpy as np

from vptrain.config import RunConfig
from vptrain.data_meta import TOKEN_DTYPES, DataMeta, data_metas, token_files

SAMPLE_TOKENS = 1 << 16
"""Tokens read from each of three places (start, middle, end) of a large data file."""
SAMPLE_FILES = 16
"""Files read, spread evenly over a long list (meta.json's max_token_id covers the rest)."""
WHOLE_BYTES = 1 << 28
"""Token files up to this size in all are read whole: every id checked, not a sample."""


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


def check_data(cfg: RunConfig) -> None:
    """memmap training files and the evaluation file: whole tokens of data.dtype (adopt_data_meta
    made it concrete), the dtype and vocabulary their meta.json say, ids below model.vocab_size."""
    d = cfg.data
    if (d.name == "memmap" or d.eval_path) and d.dtype not in TOKEN_DTYPES:
        _fail("data.dtype", f"'{d.dtype}': token files are {' or '.join(TOKEN_DTYPES)}")
    metas = data_metas(cfg)
    if d.name == "memmap" and d.path:
        _check_files("data.path", token_files(d.path), d.dtype, cfg.model.vocab_size,
                     [m for key, m in metas if key == "data.path"])
    if d.eval_path:
        _check_files("data.eval_path", token_files(d.eval_path), d.dtype, cfg.model.vocab_size,
                     [m for key, m in metas if key == "data.eval_path"])


def _check_files(key: str, files: list[str], dtype: str, vocab: int, metas: list[DataMeta]) -> None:
    if not files:
        return  # validate.py names the missing files
    itemsize = np.dtype(dtype).itemsize
    for f in files:
        size = os.path.getsize(f)
        if size % itemsize:
            _fail("data.dtype", f"{f} is {size} bytes, not a whole number of {dtype} tokens ({itemsize} bytes "
                                "each): a truncated file, or tokens of another dtype")
    for meta in metas:
        _check_meta(meta, dtype, vocab)
    whole = sum(os.path.getsize(f) for f in files) <= WHOLE_BYTES
    picked = files if len(files) <= SAMPLE_FILES else [files[round(i * (len(files) - 1) / (SAMPLE_FILES - 1))]
                                                        for i in range(SAMPLE_FILES)]
    said = next((m for m in metas if m.dtype == dtype), None)
    for f in picked:
        _check_ids(key, f, dtype, vocab, whole, said)


def _check_meta(meta: DataMeta, dtype: str, vocab: int) -> None:
    if meta.dtype is not None and meta.dtype != dtype:
        _fail("data.dtype", f"{dtype}, but {meta.path} says the tokens are {meta.dtype}; leave data.dtype out "
                            f"(auto: taken from meta.json) or set data.dtype={meta.dtype}")
    if meta.ids is not None and meta.ids > vocab:
        suggest = max(meta.ids, meta.vocab_size or 0)
        _fail("model.vocab_size", f"{vocab}, but {meta.path} says the tokens take {meta.ids} ids (the tokenizer's "
                                  f"vocabulary); set model.vocab_size={suggest} or more")
    if meta.max_token_id is not None and meta.max_token_id >= vocab:
        _fail("model.vocab_size", f"{vocab}, but {meta.path} says the files hold token id {meta.max_token_id}; "
                                  f"set model.vocab_size={meta.max_token_id + 1} or more")


def _tokens(path: str, dtype: str, whole: bool) -> np.ndarray:
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    n = len(tokens)
    if whole or n <= 3 * SAMPLE_TOKENS:
        return tokens
    middle = (n - SAMPLE_TOKENS) // 2
    return np.concatenate([tokens[:SAMPLE_TOKENS], tokens[middle:middle + SAMPLE_TOKENS], tokens[-SAMPLE_TOKENS:]])


def _check_ids(key: str, path: str, dtype: str, vocab: int, whole: bool, said: DataMeta | None) -> None:
    if os.path.getsize(path) == 0:
        return
    tokens = _tokens(path, dtype, whole)
    # Where the dtype came from meta.json, a contradiction means the meta describes other files.
    blame = (f"; {said.path} says {dtype}, so it describes other files: rewrite it with `vptrain prepare-data` "
             "or remove it") if said else ""
    head = np.memmap(path, dtype=np.dtype(dtype), mode="r")[: 2 * SAMPLE_TOKENS]  # from the start: parity kept
    if dtype == "uint16" and head.size >= 64 and os.path.getsize(path) % 4 == 0:
        # uint32 ids below 65536 read as uint16: every second value is a zero high half.
        if not head[1::2].any() and head[0::2].any():
            _fail("data.dtype", f"{path} looks like uint32 tokens (every second uint16 is 0); set data.dtype=uint32"
                                + blame)
    top = int(tokens.max())
    if top < vocab:
        return
    if dtype == "uint32" and int(_tokens(path, "uint16", whole).max()) < vocab:
        _fail("data.dtype", f"{path} holds token id {top} >= model.vocab_size={vocab} as uint32, but reads as valid "
                            "uint16 tokens: set data.dtype=uint16" + blame)
    where = "" if key == "data.path" else f" ({key})"
    _fail("model.vocab_size", f"{path}{where} holds token id {top} >= model.vocab_size={vocab}; raise "
                              f"model.vocab_size to at least {top + 1}, or check data.dtype")
