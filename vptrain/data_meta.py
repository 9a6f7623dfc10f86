"""The meta.json that `vptrain prepare-data` writes beside its token files, read before launch.

It says how the tokens are stored (dtype) and how many ids they take (the tokenizer's vocabulary),
so a run neither reads the files with another dtype nor trains with a vocabulary too small for
them. adopt_data_meta fills data.dtype from it (vptrain/cli.py materialize, every command);
vptrain/preflight_inputs.py checks model.vocab_size and the files against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from vptrain.config import RunConfig

AUTO = "auto"
"""data.dtype left to the data: its meta.json's dtype, else DEFAULT_DTYPE."""
DEFAULT_DTYPE = "uint16"
TOKEN_DTYPES = ("uint16", "uint32")
META_NAME = "meta.json"


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataMeta:
    """What one meta.json says about the token files beside it."""

    path: str
    dtype: str | None
    ids: int | None
    """Token ids are below this (the tokenizer's vocabulary size)."""
    vocab_size: int | None
    """The model.vocab_size prepare-data suggested (at least `ids`)."""
    max_token_id: int | None
    """The largest id written (prepare-data counts it while encoding)."""


def token_files(path: str) -> list[str]:
    from vptrain.validate import resolve_data_files

    return resolve_data_files(os.path.expanduser(path))


def metas_of(key: str, path: str | None) -> list[DataMeta]:
    """The meta.json of each directory holding the token files at `path` (data.path or
    data.eval_path, named by `key` in errors)."""
    if not path:
        return []
    folders = {os.path.dirname(os.path.abspath(f)) for f in token_files(path)}
    found = [read_meta(key, os.path.join(folder, META_NAME)) for folder in sorted(folders)]
    return [m for m in found if m is not None]


def read_meta(key: str, meta_path: str) -> DataMeta | None:
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        _fail(key, f"{meta_path} is not valid JSON (truncated?); rewrite it with `vptrain prepare-data` or remove it")
    if not isinstance(meta, dict):
        _fail(key, f"{meta_path} is not a prepare-data meta file (expected a JSON object)")
    dtype = meta.get("dtype")
    if dtype is not None and dtype not in TOKEN_DTYPES:
        _fail(key, f"{meta_path} says dtype {dtype!r}; prepare-data writes {' or '.join(TOKEN_DTYPES)}: rewrite it "
                   "with `vptrain prepare-data` or remove it")

    def whole(name: str) -> int | None:
        value = meta.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            _fail(key, f"{meta_path}: {name} is {value!r}, not a count; rewrite it with `vptrain prepare-data`")
        return value

    vocab, ids = whole("vocab_size"), whole("tokenizer_vocab_size")
    return DataMeta(meta_path, dtype, ids if ids is not None else vocab, vocab, whole("max_token_id"))


def data_metas(cfg: RunConfig) -> list[tuple[str, DataMeta]]:
    """(key, meta) for the training files (data=memmap) and the evaluation file (data.eval_path)."""
    d = cfg.data
    found = [("data.path", m) for m in metas_of("data.path", d.path)] if d.name == "memmap" else []
    return found + [("data.eval_path", m) for m in metas_of("data.eval_path", d.eval_path)]


def meta_dtype(metas: list[tuple[str, DataMeta]]) -> tuple[str, DataMeta] | None:
    """The one dtype the metas agree on (with the first meta that says it), None when none says."""
    said = [(key, m) for key, m in metas if m.dtype is not None]
    for key, m in said[1:]:
        if m.dtype != said[0][1].dtype:
            _fail(key, f"{m.path} says the tokens are {m.dtype}, but {said[0][1].path} says {said[0][1].dtype}: "
                       "one run reads every token file with one data.dtype; re-prepare one of them")
    return said[0] if said else None


def adopt_data_meta(cfg: RunConfig) -> RunConfig:
    """cfg with data.dtype resolved: data.dtype=auto (the default) takes the dtype the data's
    meta.json says, else uint16; an explicit data.dtype that contradicts meta.json is a ValueError."""
    agreed = meta_dtype(data_metas(cfg))
    dtype = cfg.data.dtype
    if dtype == AUTO:
        dtype = agreed[1].dtype if agreed else DEFAULT_DTYPE
    elif agreed and agreed[1].dtype != dtype:
        key, meta = agreed
        _fail("data.dtype", f"{dtype}, but {meta.path} ({key}) says the tokens are {meta.dtype}; leave data.dtype "
                            f"out (auto: taken from meta.json) or set data.dtype={meta.dtype}")
    if dtype == cfg.data.dtype:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dtype=dtype))


def concrete_dtype(cfg: RunConfig) -> str:
    """data.dtype as the files are read: itself, or for auto what adopt_data_meta resolves (for a
    config built without vptrain/cli.py, e.g. composed in a test; the CLI resolves it before saving)."""
    return cfg.data.dtype if cfg.data.dtype != AUTO else adopt_data_meta(cfg).data.dtype
