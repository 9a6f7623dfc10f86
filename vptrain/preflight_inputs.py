"""Pre-launch checks of what a run reads: the memmap token files and the checkpoint to resume.
Each raises ValueError naming the key (vptrain/preflight.py runs them)."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from vptrain.config import RunConfig
from vptrain.validate import resolve_data_files

SAMPLE_TOKENS = 1 << 16
"""Tokens read from each of three places (start, middle, end) of each data file."""
SAMPLE_FILES = 16
LAYOUT_KEYS = ("layout.pp", "layout.dp", "method.name", "schedule.name", "model.vocab_size", "model.hidden_size",
               "model.num_layers", "model.tie_embeddings", "vocab.pad_to_multiple_of", "optim.name", "model.arch",
               "model.num_kv_heads", "model.intermediate_size")
"""What a checkpoint must share with the run resuming it (until resharding exists)."""
META_KEYS = {"layout.pp": "pp", "layout.dp": "dp", "method.name": "method", "schedule.name": "schedule",
             "model.vocab_size": "vocab_size", "model.hidden_size": "hidden_size", "model.num_layers": "num_layers"}
"""The same keys as checkpoint meta.json names them (where it records them)."""


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


# --- data -----------------------------------------------------------------------------------------


def check_data(cfg: RunConfig) -> None:
    """memmap files: whole tokens of data.dtype, the dtype prepare-data wrote, ids below
    model.vocab_size (meta.json when present, and a sample of every file)."""
    d, vocab = cfg.data, cfg.model.vocab_size
    if d.name != "memmap" or not d.path:
        return
    files = resolve_data_files(os.path.expanduser(d.path))
    itemsize = np.dtype(d.dtype).itemsize
    for f in files:
        size = os.path.getsize(f)
        if size % itemsize:
            _fail("data.dtype", f"{f} is {size} bytes, not a whole number of {d.dtype} tokens ({itemsize} bytes "
                                "each): a truncated file, or tokens of another dtype")
    meta = _data_meta(d.path, files)
    if meta:
        if meta.get("dtype") not in (None, d.dtype):
            _fail("data.dtype", f"{d.dtype}, but {meta['_path']} says the tokens are {meta['dtype']}; "
                                f"set data.dtype={meta['dtype']}")
        ids = meta.get("tokenizer_vocab_size") or meta.get("vocab_size")
        if isinstance(ids, int) and ids > vocab:
            _fail("model.vocab_size", f"{vocab}, but {meta['_path']} says the tokens take {ids} ids; "
                                      f"set model.vocab_size={meta.get('vocab_size', ids)}")
    for f in files[:SAMPLE_FILES]:
        _check_sample(f, d.dtype, vocab)


def _data_meta(path: str, files: list[str]) -> dict | None:
    folder = path if os.path.isdir(path) else os.path.dirname(files[0])
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        _fail("data.path", f"{meta_path} is not valid JSON (truncated?); rewrite it with `vptrain prepare-data` "
                           "or remove it")
    if not isinstance(meta, dict):
        _fail("data.path", f"{meta_path} is not a prepare-data meta file (expected a JSON object)")
    return {**meta, "_path": meta_path}


def _sample(path: str, dtype: str) -> np.ndarray:
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    n = len(tokens)
    if n <= 3 * SAMPLE_TOKENS:
        return np.asarray(tokens)
    middle = (n - SAMPLE_TOKENS) // 2
    return np.concatenate([tokens[:SAMPLE_TOKENS], tokens[middle:middle + SAMPLE_TOKENS], tokens[-SAMPLE_TOKENS:]])


def _check_sample(path: str, dtype: str, vocab: int) -> None:
    sample = _sample(path, dtype)
    if sample.size == 0:
        return
    if dtype == "uint16" and sample.size >= 64 and os.path.getsize(path) % 4 == 0:
        # uint32 ids below 65536 read as uint16: every second value is a zero high half.
        evens, odds = sample[0::2], sample[1::2]
        if not odds.any() and evens.any():
            _fail("data.dtype", f"{path} looks like uint32 tokens (every second uint16 is 0); set data.dtype=uint32")
    top = int(sample.max())
    if top < vocab:
        return
    if dtype == "uint32" and int(_sample(path, "uint16").max()) < vocab:
        _fail("data.dtype", f"{path} holds token id {top} >= model.vocab_size={vocab} as uint32, but reads as valid "
                            "uint16 tokens: set data.dtype=uint16")
    _fail("model.vocab_size", f"{path} holds token id {top} >= model.vocab_size={vocab}; raise model.vocab_size to "
                              f"at least {top + 1}, or check data.dtype")


# --- resume ---------------------------------------------------------------------------------------


def check_resume(cfg: RunConfig) -> None:
    """The checkpoint a resume would load is complete and of this run's layout. train.resume=auto
    with a `latest` that names no complete checkpoint is refused rather than silently starting over."""
    resume = cfg.train.resume
    if resume == "never":
        return
    from vptrain import checkpoint  # the trainer's own choice of directory (with its fallback rules)

    root = checkpoint.checkpoint_root(cfg)
    if resume == "auto":
        path = checkpoint.resolve_resume(cfg)
        if path is None:
            pointer = os.path.join(root, "latest")
            steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
            if os.path.exists(pointer) or steps:
                name = _read_text(pointer) if os.path.exists(pointer) else ""
                named_dir = os.path.join(root, name)
                if name and os.path.isdir(named_dir):
                    check_checkpoint(cfg, named_dir)  # says what is wrong with it, when it can tell
                named = repr(_read_text(pointer)) if os.path.exists(pointer) else "nothing (no latest file)"
                complete = [d for d in steps if os.path.isfile(os.path.join(root, d, "meta.json"))]
                what = (f"the newest complete one is {complete[-1]}: resume it with "
                        f"train.resume={os.path.join(root, complete[-1])}" if complete else
                        "no checkpoint there is complete (with its meta.json): remove that directory to start over")
                _fail("train.resume", f"auto: {pointer} names {named}, which is not a complete checkpoint; {what}")
            return
    else:
        path = resume
    check_checkpoint(cfg, path)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "an unreadable file"


def check_checkpoint(cfg: RunConfig, path: str) -> None:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        hint = ""
        for pointer in (os.path.join(path, "latest"), os.path.join(path, "checkpoints", "latest")):
            if os.path.isfile(pointer):
                hint = f"; {pointer} names {os.path.join(os.path.dirname(pointer), _read_text(pointer))}"
        hint = hint or "; give a step_* directory from a run directory's checkpoints/"
        _fail("train.resume", f"{path} is not a checkpoint (no meta.json){hint}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        _fail("train.resume", f"{meta_path} is truncated or not a vptrain checkpoint's meta; resume from another "
                              "checkpoint (train.resume=DIR) or remove this one")
    _check_layout(cfg, path, meta)
    world = int(meta.get("world_size", cfg.layout.pp * cfg.layout.dp))
    for rank in range(world):
        _check_rank_file(path, rank)


def _check_layout(cfg: RunConfig, path: str, meta: dict) -> None:
    """Compare what the checkpoint records (meta.json, and the config.yaml of the run that wrote it)."""
    written = {key: meta[short] for key, short in META_KEYS.items() if short in meta}
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if os.path.isfile(run_config):
        try:
            from vptrain.config import load

            saved = {key: _get(load(run_config), key) for key in LAYOUT_KEYS}
            # Only the config of the run that wrote the checkpoint: a later run may have replaced it.
            if all(saved[key] == value for key, value in written.items()):
                written = {**saved, **written}
        except Exception:  # noqa: BLE001 - an unreadable old config: compare what meta.json has
            pass
    differ = [k for k, v in written.items() if v != _get(cfg, k)]
    if differ:
        what = ", ".join(f"{k}={written[k]} (this run: {_get(cfg, k)})" for k in differ)
        shown = [k for k in LAYOUT_KEYS[:6] if k in written]

        def layout(values) -> str:
            return " ".join(f"{k.removesuffix('.name').split('.')[-1]}={values(k)}" for k in shown)

        _fail("train.resume", f"checkpoint {path} has another layout: {what} [checkpoint: {layout(written.get)}; "
                              f"this run: {layout(lambda k: _get(cfg, k))}]; resume with the checkpoint's layout "
                              "(resharding is not supported) or use a new hydra.run.dir")


def _get(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_rank_file(path: str, rank: int) -> None:
    name = os.path.join(path, f"rank_{rank}.pt")
    if not os.path.isfile(name):
        _fail("train.resume", f"checkpoint {path} has no {os.path.basename(name)}: incomplete; resume from another "
                              "checkpoint or remove this one")
    with open(name, "rb") as f:
        head = f.read(4)
    if not head:
        _fail("train.resume", f"{name} is empty: the checkpoint is incomplete; resume from another one")
    if head == b"PK\x03\x04":  # torch.save's zip format: its directory sits at the end of the file
        try:
            with zipfile.ZipFile(name):
                pass
        except zipfile.BadZipFile:
            _fail("train.resume", f"{name} is truncated: the checkpoint is incomplete; resume from another one")
