"""model.init_from=hf:DIR and `vptrain export-hf`, in process: config.json -> model.*, the tensor
mapping checked against transformers' own models (same logits), the clear errors, and the GPT-2
export. The layouts (pipeline ranks, vocabulary shards) are tests/distributed/test_hf_layouts.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from vptrain.config import RunConfig
from vptrain.engine.common import gpt_shape
from vptrain.engine.param_names import VOCAB_INPUT, VOCAB_OUTPUT, global_slices
from vptrain.hf.config_json import hf_config
from vptrain.hf.export import hf_state, write_hf_model
from vptrain.hf.export import main as export_main
from vptrain.hf.load import HFCheckpointError, read_rank_parameters
from vptrain.hf.shape import adopt_hf_shape
from vptrain.init_from import apply_init_from
from vptrain.model import build_model

transformers = pytest.importorskip("transformers")

V, H, LAYERS = 1001, 64, 2
ROWS = 1004  # our padded tables: rows 1001..1003 are padding


def _llama(tmp_path, *, tied: bool = False, **config) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, **config)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to one: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path / ("llama-tied" if tied else "llama")
    model.save_pretrained(out)
    return str(out)


def _cfg(tmp_path, directory: str, *overrides: str, **model) -> RunConfig:
    cfg = RunConfig(run_dir=str(tmp_path / "run"), overrides=list(overrides))
    model.setdefault("seq_len", 16)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=f"hf:{directory}", **model))
    return adopt_hf_shape(cfg, overrides=cfg.overrides)


def _imported(tmp_path, directory: str, rows: int = ROWS) -> tuple[torch.nn.Module, RunConfig]:
    cfg = _cfg(tmp_path, directory)
    model = build_model(gpt_shape(cfg, vocab_rows=rows))
    apply_init_from(cfg, model, global_slices(model, num_layers=cfg.model.num_layers, vocab_rows=rows))
    return model, cfg


def test_config_json_sets_the_model(tmp_path):
    cfg = _cfg(tmp_path, _llama(tmp_path))
    m = cfg.model
    assert (m.arch, m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == ("llama", V, H, 2, 4, 2)
    assert (m.intermediate_size, m.rope_theta, m.norm_eps, m.tie_embeddings) == (96, 500000.0, 1e-5, False)
    assert m.seq_len == 16 and m.max_position_embeddings == 64 and m.init_from.startswith("hf:/")


@pytest.mark.parametrize("tied", [False, True])
def test_imported_llama_gives_transformers_logits(tmp_path, tied):
    directory = _llama(tmp_path, tied=tied)
    ours, cfg = _imported(tmp_path, directory)
    assert cfg.model.tie_embeddings is tied
    theirs = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids)
    # fp32, the same operations in another order: a few ulps of logits of size ~1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ours[0].wte[V:].abs().max() == 0, "padding rows stay zero"
    record = json.loads((tmp_path / "run" / "init_from" / "rank_0.json").read_text())
    tables = {name: rows for name, rows in record["reads"] if name in ("model.embed_tokens.weight", "lm_head.weight")}
    assert tables == ({"model.embed_tokens.weight": [0, V]} if tied else
                      {"model.embed_tokens.weight": [0, V], "lm_head.weight": [0, V]})


def test_a_vocabulary_shard_reads_only_its_rows(tmp_path):
    directory = _llama(tmp_path)
    stored = load_file(f"{directory}/model.safetensors")
    shard = torch.nn.Module()  # what a vocab method's stage holds beside its layers: rows [502, 1004)
    shard.vocab_input = torch.nn.Parameter(torch.full((502, H), 7.0))
    shard.vocab_output = torch.nn.Parameter(torch.full((502, H), 7.0))
    slices = global_slices(shard, num_layers=LAYERS, vocab_rows=ROWS, shard=(502, 1004))
    reads = read_rank_parameters(directory, shard, slices, arch="llama", num_layers=LAYERS, vocab_size=V)
    assert [r.to_list() for r in reads] == [["model.embed_tokens.weight", [502, V]], ["lm_head.weight", [502, V]]]
    assert torch.equal(shard.vocab_input[: V - 502], stored["model.embed_tokens.weight"][502:])
    assert torch.equal(shard.vocab_output[: V - 502], stored["lm_head.weight"][502:])
    assert shard.vocab_input[V - 502:].abs().max() == 0 and shard.vocab_output[V - 502:].abs().max() == 0
    assert {VOCAB_INPUT, VOCAB_OUTPUT} == set(slices)


@pytest.mark.parametrize("change, names", [
    ("drop", "model.layers.1.mlp.up_proj.weight"),
    ("reshape", "model.layers.0.self_attn.k_proj.weight"),
    ("drop", "lm_head.weight"),
])
def test_missing_or_misshaped_tensor_is_named(tmp_path, change, names):
    directory = _llama(tmp_path)
    cfg = _cfg(tmp_path, directory)
    model = build_model(gpt_shape(cfg, vocab_rows=ROWS))
    tensors = load_file(f"{directory}/model.safetensors")
    if change == "drop":
        del tensors[names]
    else:
        tensors[names] = tensors[names][:, :-1].contiguous()
    save_file(tensors, f"{directory}/model.safetensors", metadata={"format": "pt"})
    pattern = names.replace(".", r"\.")
    with pytest.raises(HFCheckpointError, match=pattern):  # before launch: headers only
        _cfg(tmp_path, directory)
    with pytest.raises(HFCheckpointError, match=pattern):  # and again on the rank that reads it
        read_rank_parameters(directory, model, global_slices(model, num_layers=LAYERS, vocab_rows=ROWS),
                             arch="llama", num_layers=LAYERS, vocab_size=V)
    if change == "reshape":  # the CLI: one line, exit 2, nothing started
        proc = run_cli("plan", f"model.init_from=hf:{directory}", f"hydra.run.dir={tmp_path / 'plan'}", timeout=120)
        assert proc.returncode == 2 and names in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("key, value, named", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("head_dim", 32, "head_dim"),
    ("model_type", "mistral", "model_type"),
])
def test_unsupported_config_json_is_refused(tmp_path, key, value, named):
    (tmp_path / "m").mkdir()
    config = {"model_type": "llama", "vocab_size": V, "hidden_size": H, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 96, key: value}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        _cfg(tmp_path, str(tmp_path / "m"))


def test_overrides_must_agree_with_config_json(tmp_path):
    directory = _llama(tmp_path)
    assert _cfg(tmp_path, directory, "model.hidden_size=64", hidden_size=64).model.hidden_size == H  # restating: fine
    with pytest.raises(ValueError, match=r"model\.num_kv_heads=4 contradicts"):
        _cfg(tmp_path, directory, "model.num_kv_heads=4", num_kv_heads=4)
    with pytest.raises(ValueError, match=r"model\.seq_len: 128 > max_position_embeddings=64"):
        _cfg(tmp_path, directory, seq_len=128)
    # The CLI: one line naming the key, exit 2, before anything starts.
    proc = run_cli("plan", f"model.init_from=hf:{directory}", "model.hidden_size=128", "layout.pp=2",
                   f"hydra.run.dir={tmp_path / 'plan'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.hidden_size=128 contradicts" in proc.stderr and "Traceback" not in proc.stderr


def _gpt(tied: bool) -> tuple[torch.nn.Module, RunConfig]:
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=V, num_layers=LAYERS, hidden_size=H,
                                                             seq_len=16, tie_embeddings=tied, norm_eps=1e-5))
    model = build_model(gpt_shape(cfg, vocab_rows=ROWS))
    with torch.no_grad():  # zero biases and unit norms would hide a mapping mistake
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "ln" in name else 0.0))
        model[0].wte[V:] = 0
        if not tied:
            model[-1].weight[V:] = 0
    return model, cfg


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_exports_as_gpt2_with_the_same_logits_and_imports_back(tmp_path, tied):
    ours, cfg = _gpt(tied)
    params = {name: p.detach() for name, p in ours.named_parameters()}  # single-process names are global
    model = dataclasses.asdict(cfg.model)
    shard = 1 << 40 if tied else 100_000  # untied: written as several shards plus an index
    write_hf_model(str(tmp_path / "gpt2"), hf_state(params, model), hf_config(model, positions=16), [],
                   max_shard_bytes=shard)
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").exists() is not tied
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert theirs.config.tie_word_embeddings is tied
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    back, back_cfg = _imported(tmp_path, str(tmp_path / "gpt2"))
    assert back_cfg.model.arch == "gpt" and back_cfg.model.max_position_embeddings == 16
    for (name, p), (_, q) in zip(ours.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_export_bad_inputs_exit_2(tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "no checkpoints/" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--step", "3"]) == 2
    assert "--step 3" in capsys.readouterr().err
    assert export_main([str(tmp_path / "run")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        write_hf_model(str(tmp_path / "full"), {}, {}, [])


def test_export_ships_the_tokenizer_the_data_was_prepared_with(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vptrain.hf.export import tokenizer_sources

    data = tmp_path / "data"
    data.mkdir()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(data / "tokenizer.json"))
    meta = {"data": {"path": str(data / "train.bin")}, "model": {"init_from": None}}
    assert tokenizer_sources(meta) == [str(data / "tokenizer.json")]
    assert tokenizer_sources({"data": {"path": str(tmp_path / "elsewhere.bin")}, "model": {}}) == []
    write_hf_model(str(tmp_path / "out"), {"x": torch.zeros(1)}, {"model_type": "llama"}, tokenizer_sources(meta))
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded("hello world")["input_ids"] == [1, 2]
