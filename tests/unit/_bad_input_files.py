"""Files the bad-input table (test_bad_inputs.py) points at: broken token files and checkpoints.
Each builder writes under the test's directory and returns the overrides that use what it wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vptrain.config import RunConfig, to_yaml


def _tokens(folder: Path, name: str, ids: np.ndarray, dtype: str, meta: dict | str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ids.astype(dtype).tofile(path)
    if meta is not None:
        (folder / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path


def _memmap(path: Path, *extra: str) -> list[str]:
    return ["data=memmap", f"data.path={path}", *extra]


def odd_size_uint16(tmp: Path) -> list[str]:
    path = _tokens(tmp / "data", "a.bin", np.arange(600) % 500, "uint16")
    with open(path, "ab") as f:
        f.write(b"\0")  # half a token
    return _memmap(path)


def ids_beyond_vocab(tmp: Path) -> list[str]:
    return _memmap(_tokens(tmp / "data", "a.bin", np.arange(2000) % 1000, "uint16"), "model.vocab_size=512")


def uint32_read_as_uint16(tmp: Path) -> list[str]:
    return _memmap(_tokens(tmp / "data", "a.bin", np.arange(2000) % 500, "uint32"))


def uint16_read_as_uint32(tmp: Path) -> list[str]:
    return _memmap(_tokens(tmp / "data", "a.bin", np.arange(2000) % 500 + 1, "uint16"), "data.dtype=uint32")


def meta_other_dtype(tmp: Path) -> list[str]:
    _tokens(tmp / "data", "a.bin", np.arange(2000) % 500, "uint16", {"dtype": "uint32", "vocab_size": 500})
    return _memmap(tmp / "data")


def meta_bigger_vocab(tmp: Path) -> list[str]:
    _tokens(tmp / "data", "a.bin", np.arange(2000) % 500, "uint16", {"dtype": "uint16", "vocab_size": 4096,
                                                                       "tokenizer_vocab_size": 4096})
    return _memmap(tmp / "data")


def meta_truncated(tmp: Path) -> list[str]:
    _tokens(tmp / "data", "a.bin", np.arange(2000) % 500, "uint16", '{"dtype": "uint1')
    return _memmap(tmp / "data")


def no_bin_files(tmp: Path) -> list[str]:
    (tmp / "data").mkdir()
    return _memmap(tmp / "data")


RUN = "run"
DEFAULT = {"pp": 2, "dp": 1, "method": "vocab-2", "world_size": 2}


def checkpoint_files(tmp: Path, *, meta: dict | str | None = None, ranks: dict[int, bytes | None] | None = None,
                latest: str | None = "step_00000002", config: RunConfig | None = None) -> Path:
    """A checkpoint as vptrain lays it out under tmp/run (files only: nothing loads it here)."""
    root = tmp / RUN / "checkpoints"
    step = root / "step_00000002"
    step.mkdir(parents=True)
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps({"step": 2, "losses": [5.0, 4.0], **meta})
        (step / "meta.json").write_text(text)
    for rank, content in (ranks if ranks is not None else {0: None, 1: None}).items():
        path = step / f"rank_{rank}.pt"
        torch.save({"rank": rank, "weights": torch.zeros(8)}, path)
        if content is not None:
            path.write_bytes(content if content != b"half" else path.read_bytes()[:60])
    if latest is not None:
        (root / "latest").write_text(latest)
    if config is not None:
        (tmp / RUN / "config.yaml").write_text(to_yaml(config))
    return step


def auto(tmp: Path) -> list[str]:
    return ["train.resume=auto"]


def latest_names_missing(tmp: Path) -> list[str]:
    root = tmp / RUN / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("step_00000009")
    return auto(tmp)


def not_a_checkpoint(tmp: Path) -> list[str]:
    (tmp / "elsewhere").mkdir()
    return [f"train.resume={tmp / 'elsewhere'}"]


def run_dir_as_checkpoint(tmp: Path) -> list[str]:
    checkpoint_files(tmp, meta=DEFAULT)
    return [f"train.resume={tmp / RUN}"]


def meta_json_truncated(tmp: Path) -> list[str]:
    checkpoint_files(tmp, meta='{"step": 2, "losses": [5.0,')
    return auto(tmp)


def meta_json_empty(tmp: Path) -> list[str]:
    step = checkpoint_files(tmp, meta="")
    return [f"train.resume={step}"]


def rank_file_empty(tmp: Path) -> list[str]:
    checkpoint_files(tmp, meta=DEFAULT, ranks={0: None, 1: b""})
    return auto(tmp)


def rank_file_truncated(tmp: Path) -> list[str]:
    checkpoint_files(tmp, meta=DEFAULT, ranks={0: b"half", 1: None})
    return auto(tmp)


def rank_file_missing(tmp: Path) -> list[str]:
    checkpoint_files(tmp, meta=DEFAULT, ranks={0: None})
    return auto(tmp)


def other_layout(**meta) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        checkpoint_files(tmp, meta={**DEFAULT, **meta}, ranks={r: None for r in range(meta.get("world_size", 2))})
        return auto(tmp)

    return setup


def other_model(**model) -> Callable[[Path], list[str]]:
    """The run that wrote the checkpoint had another model (recorded in its config.yaml)."""

    def setup(tmp: Path) -> list[str]:
        written = RunConfig()
        for key, value in model.items():
            setattr(written.model, key, value)
        written.run_dir = str(tmp / RUN)
        checkpoint_files(tmp, meta=DEFAULT, config=written)
        return auto(tmp)

    return setup


def run_dir_is_file(tmp: Path) -> list[str]:
    (tmp / RUN).write_text("not a directory")
    return []


def run_dir_under_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("not a directory")
    return [f"hydra.run.dir={tmp / 'file' / 'run'}"]
