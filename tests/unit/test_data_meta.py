"""The meta.json beside the token files, checked before launch: data.dtype adopted from it, a
model.vocab_size too small for the tokenizer or the ids refused with the key named (not a crash
inside a rank at step 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import vptrain.cli as cli
from vptrain.config import DataConfig, ModelConfig, RunConfig
from vptrain.data_meta import adopt_data_meta
from vptrain.preflight_inputs import check_data


def token_dir(folder: Path, ids, dtype: str, meta: dict | None = None, name: str = "train_0000.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(ids).astype(dtype).tofile(folder / name)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def prepared(folder: Path, ids, dtype: str, tokenizer_ids: int) -> Path:
    """Token files and the meta.json fields prepare-data writes."""
    ids = np.asarray(ids)
    return token_dir(folder, ids, dtype, {"dtype": dtype, "vocab_size": tokenizer_ids,
                                          "tokenizer_vocab_size": tokenizer_ids, "max_token_id": int(ids.max()),
                                          "num_tokens": len(ids), "shards": ["train_0000.bin"]})


def memmap_cfg(path: Path, vocab: int = 512, dtype: str | None = None, eval_path: Path | None = None) -> RunConfig:
    data = DataConfig(name="memmap", path=str(path), eval_path=str(eval_path) if eval_path else None)
    if dtype is not None:
        data.dtype = dtype
    return RunConfig(model=ModelConfig(vocab_size=vocab), data=data)


# --- data.dtype from meta.json ----------------------------------------------------------------------


def test_dtype_left_at_auto_is_taken_from_meta_json(tmp_path):
    folder = prepared(tmp_path / "d", np.arange(2000) % 500, "uint32", 500)
    cfg = memmap_cfg(folder)
    assert cfg.data.dtype == "auto", "the schema's default"
    adopted = adopt_data_meta(cfg)
    assert adopted.data.dtype == "uint32"
    assert cfg.data.dtype == "auto", "the caller's config is not mutated"
    check_data(adopted)  # the files read as uint32 pass every check


def test_dtype_without_meta_json_is_uint16_and_a_synthetic_run_gets_a_concrete_one(tmp_path):
    folder = token_dir(tmp_path / "d", np.arange(2000) % 500, "uint16")
    assert adopt_data_meta(memmap_cfg(folder)).data.dtype == "uint16"
    assert adopt_data_meta(RunConfig()).data.dtype == "uint16"


def test_an_explicit_dtype_that_contradicts_meta_json_is_refused(tmp_path):
    folder = prepared(tmp_path / "d", np.arange(2000) % 500, "uint32", 500)
    with pytest.raises(ValueError, match=r"^data\.dtype: uint16, but .*meta\.json .*says the tokens are uint32"):
        adopt_data_meta(memmap_cfg(folder, dtype="uint16"))
    assert adopt_data_meta(memmap_cfg(folder, dtype="uint32")).data.dtype == "uint32", "agreeing is fine"


def test_eval_file_meta_counts_too_and_must_agree_with_the_training_files(tmp_path):
    train = prepared(tmp_path / "train", np.arange(2000) % 500, "uint16", 500)
    held_out = prepared(tmp_path / "eval", np.arange(2000) % 500, "uint32", 500)
    synthetic = RunConfig(data=DataConfig(eval_path=str(held_out / "train_0000.bin")))
    assert adopt_data_meta(synthetic).data.dtype == "uint32", "data.eval_path's meta decides without memmap data"
    with pytest.raises(ValueError, match=r"^data\.eval_path: .*uint32.*uint16"):
        adopt_data_meta(memmap_cfg(train, eval_path=held_out / "train_0000.bin"))


# --- vocabulary and ids ----------------------------------------------------------------------------


def test_model_vocab_smaller_than_the_tokenizer_is_refused_naming_model_vocab_size(tmp_path):
    folder = prepared(tmp_path / "d", np.arange(2000) % 300, "uint16", 1000)
    with pytest.raises(ValueError, match=r"^model\.vocab_size: 512, but .* take 1000 ids .*model\.vocab_size=1000"):
        check_data(adopt_data_meta(memmap_cfg(folder, vocab=512)))
    check_data(adopt_data_meta(memmap_cfg(folder, vocab=1000)))


def test_ids_at_or_beyond_the_vocabulary_are_refused_without_meta(tmp_path):
    ids = np.arange(5000) % 400
    ids[4321] = 512  # one id, == vocab_size, deep in the file: the whole (small) file is read
    folder = token_dir(tmp_path / "d", ids, "uint16")
    with pytest.raises(ValueError, match=r"^model\.vocab_size: .* holds token id 512 >= model\.vocab_size=512"):
        check_data(adopt_data_meta(memmap_cfg(folder, vocab=512)))
    check_data(adopt_data_meta(memmap_cfg(folder, vocab=513)))


def test_meta_max_token_id_beyond_the_vocabulary_is_refused(tmp_path):
    folder = token_dir(tmp_path / "d", np.arange(2000) % 300, "uint16", {"dtype": "uint16", "max_token_id": 600})
    with pytest.raises(ValueError, match=r"^model\.vocab_size: 512, but .* hold token id 600"):
        check_data(adopt_data_meta(memmap_cfg(folder, vocab=512)))


def test_eval_file_ids_beyond_the_vocabulary_are_refused_naming_it(tmp_path):
    train = token_dir(tmp_path / "train", np.arange(2000) % 500, "uint16")
    held_out = token_dir(tmp_path / "eval", np.arange(2000) % 700, "uint16", name="eval.bin")
    with pytest.raises(ValueError, match=r"^model\.vocab_size: .*eval\.bin \(data\.eval_path\) holds token id 699"):
        check_data(adopt_data_meta(memmap_cfg(train, eval_path=held_out / "eval.bin")))


def test_a_meta_that_describes_other_files_is_blamed(tmp_path):
    """meta.json says uint32 but the file holds uint16 ids: read as uint32 they are huge, read as
    uint16 they fit; the message points at meta.json rather than at a dtype meta.json would refuse."""
    folder = token_dir(tmp_path / "d", np.arange(2000) % 500 + 1, "uint16", {"dtype": "uint32", "vocab_size": 500})
    with pytest.raises(ValueError, match=r"^data\.dtype: .*reads as valid uint16 .*meta\.json says uint32, so it "
                                         r"describes other files"):
        check_data(adopt_data_meta(memmap_cfg(folder)))


# --- through the CLI -------------------------------------------------------------------------------


@pytest.fixture
def reached(monkeypatch) -> list:
    """Record the config a command's handler would get instead of starting ranks."""
    seen: list = []
    monkeypatch.setattr(cli, "_handler", lambda command: lambda cfg, flags: seen.append(cfg) or 0)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites it for Hydra
    return seen


def _train(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *args])
    return exc.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_train_with_data_memmap_adopts_the_dtype_meta_json_says(tmp_path, capsys, reached):
    folder = prepared(tmp_path / "d", np.arange(4000) % 500, "uint32", 500)
    code, lines = _train([f"hydra.run.dir={tmp_path / 'run'}", "logger=none", "data=memmap", f"data.path={folder}",
                          "layout.pp=1", "method=baseline"], capsys)
    assert code == 0, f"{lines} (conf/data/memmap.yaml must leave dtype at auto)"
    assert [c.data.dtype for c in reached] == ["uint32"], "conf/data/memmap.yaml must leave dtype at auto"
    code, lines = _train([f"hydra.run.dir={tmp_path / 'run2'}", "logger=none", "data=memmap", f"data.path={folder}",
                          "data.dtype=uint16"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("vptrain train: config error: data.dtype: uint16"), lines
    assert len(reached) == 1


def test_train_with_too_small_a_vocabulary_exits_2_with_one_line(tmp_path):
    folder = prepared(tmp_path / "d", np.arange(4000) % 700, "uint16", 700)
    proc = run_cli("train", f"hydra.run.dir={tmp_path / 'run'}", "logger=none", "data=memmap", f"data.path={folder}",
                   "model.vocab_size=512", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("vptrain train: config error: model.vocab_size: 512, but"), lines[0]
    assert not (tmp_path / "run").exists(), "nothing written before the check"
